"""`mlplab` commands as real processes at the cost of a fork.

Imports torch, Lightning, MLflow and mlplab's commands once (~8 s a process otherwise), then
reads one JSON request a line (args, cwd, env, stdout and stderr files) and forks a child that
runs `mlplab.main.main(args)` as the console script would: its own pid, folder, environment and
signal handlers, output in those files, an uncaught exception printed as Python prints it, and
the exit status answered on stdout. A parent that never opened a store or ran an op is safe to
fork. Used by tests/test_bad_input.py through `ForkServer`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from mlplab.main import _quiet, main

_quiet()  # first, as `main` does: logging set up as the console script's is
import mlflow.pytorch  # noqa: E402, F401  (warm imports: what a command imports itself)

import mlplab.cli  # noqa: E402, F401
import mlplab.commands.baseline  # noqa: E402, F401
import mlplab.commands.export  # noqa: E402, F401
import mlplab.commands.predict  # noqa: E402, F401
import mlplab.commands.search  # noqa: E402, F401
import mlplab.commands.sweep  # noqa: E402, F401
import mlplab.tracking.runs  # noqa: E402, F401


def child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["mlplab", *request["args"]]
    try:
        main(request["args"])
        return 0
    except SystemExit as exit_:  # as the interpreter treats it
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  printed as an uncaught exception is
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
