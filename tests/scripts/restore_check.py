"""Fresh-process restore check for the composition tests: rebuild the user's network, restore each checkpoint
into it (``torch.load(weights_only=True)`` inside ``load_network_weights``) and compare its output with the one
recorded right after the fit.

    PYTHONPATH=tests python tests/scripts/restore_check.py CASES_JSON   # [{"checkpoint": ..., "reference": ...}, ...]

Prints one JSON line: per checkpoint the conv widths, the stage kinds and the largest output difference.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lightning_segcompress.benchmark.compression_report import conv_widths  # noqa: E402
from lightning_segcompress.state import get_stages, load_network_weights  # noqa: E402
from support.user_module import TinySegNet  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for case in json.loads(open(sys.argv[1]).read()):
        network = load_network_weights(TinySegNet(), case["checkpoint"]).eval()
        reference = torch.load(case["reference"], weights_only=True)
        with torch.no_grad():
            difference = float((network(reference["x"]) - reference["out"]).abs().max())
        results[case["checkpoint"]] = {"widths": conv_widths(network), "difference": difference,
                                       "stages": [s["kind"] for s in get_stages(network)]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
