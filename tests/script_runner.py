"""Run the project's scripts as child processes of one warm interpreter.

Starting Python and importing torch costs 2-3 s on a 2-core machine, and the test suite runs
the real scripts well over a hundred times. This server imports the heavy libraries once,
then forks one child per request; the child runs the script file as __main__ (runpy), with
its own argv, working directory, environment, output files and resource limits, exactly as
`python script.py ...` would, and exits with the script's status. The server itself never
computes with torch, so no thread pool exists to be broken by fork().

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""
import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback


def preload():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import torch  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    import tqdm  # noqa: F401

    try:
        import cleanlab.filter  # noqa: F401
    except ImportError:
        pass


def child(request):
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if request.get("memory"):
            resource.setrlimit(resource.RLIMIT_AS, (request["memory"],) * 2)
        if request.get("file_size"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["file_size"],) * 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if request["env"].get("OMP_NUM_THREADS", "").isdigit():
            # The server's OpenMP runtime read the variable when torch was imported; a child asking
            # for another thread count has to say so to torch directly.
            import torch

            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL, True
        time.sleep(0.01)


def serve():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        returncode, timed_out = wait(pid, request.get("timeout", 600))
        print(json.dumps({"returncode": returncode, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    serve()
