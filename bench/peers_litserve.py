"""The LitServe server of ``bench/peers.py``: a Cortex ``predictor.py`` as a LitAPI.

    python bench/peers_litserve.py PORT PROJECT_DIR

One uvicorn API server process and one inference worker process (LitServe's defaults
otherwise), on 127.0.0.1:PORT; ``POST /predict`` takes the sample as its JSON body and
answers the prediction, ``GET /health`` answers 200 once the worker is set up. SIGTERM (or
Ctrl-C) shuts it down, and every process it starts dies with it even if it is SIGKILLed.

A file of its own because LitServe starts its inference worker with multiprocessing's
*spawn*: the worker re-imports this module and unpickles the LitAPI, so the class must live
at module level in a module that imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import litserve as ls

from inferq.processes import die_with_parent

if __name__ == "__mp_main__":  # a process LitServe spawned: it must not outlive the server
    die_with_parent()


class PredictorAPI(ls.LitAPI):
    """``init()`` once in the inference worker, ``predict(sample, {})`` per request."""

    def __init__(self, predictor_path: str) -> None:
        super().__init__()
        self.predictor_path = predictor_path

    def setup(self, device: str) -> None:
        from harness import load_predictor

        self.predictor = load_predictor(Path(self.predictor_path))

    def decode_request(self, request):
        return request

    def predict(self, sample):
        return self.predictor.predict(sample, {})

    def encode_response(self, output):
        return output


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # LitServe shuts down gracefully on KeyboardInterrupt only


def main() -> int:
    port, project = int(sys.argv[1]), Path(sys.argv[2])
    os.register_at_fork(after_in_child=die_with_parent)  # the processes LitServe forks
    signal.signal(signal.SIGTERM, _interrupt)
    server = ls.LitServer(PredictorAPI(str(project / "predictor.py")), accelerator="cpu",
                          devices=1, workers_per_device=1)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning",
                   generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
