"""Entry point for multi-process training, one process per GPU (DDP):

    accelerate launch --multi_gpu --num_processes N -m models.dreambooth.launch --config ... --base ...
    torchrun --standalone --nproc_per_node N -m models.dreambooth.launch ...   (also on CPU, with gloo)

Every process runs this module; the main process writes the result JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from atelier.storage import write_json_atomic
from models.dreambooth.config import load_train_config
from models.dreambooth.trainer import TrainInputs, train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True, help="training YAML")
    ap.add_argument("--overrides", default="{}", help="JSON object of config keys to override")
    ap.add_argument("--base", type=Path, required=True, help="diffusers SD directory")
    ap.add_argument("--instance", type=Path, required=True, help="folder of subject photos")
    ap.add_argument("--class-dir", type=Path, default=None, help="folder of class-prior images")
    ap.add_argument("--class-noun", required=True)
    ap.add_argument("--work", type=Path, required=True, help="checkpoints; the pipeline goes to WORK/pipeline")
    ap.add_argument("--step-budget", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    ap.add_argument("--result", type=Path, default=None, help="write steps, losses and the output path here")
    args = ap.parse_args(argv)
    cfg = load_train_config(args.config, json.loads(args.overrides))
    inputs = TrainInputs(args.base, args.instance, args.class_noun, args.work, args.work / "pipeline", args.class_dir)
    stamps: dict[int, float] = {}  # step -> time its loss was read back (for throughput)
    result = train(cfg, inputs, step_budget=args.step_budget, on_progress=lambda step, *_: stamps.__setitem__(step, time.time()))
    from accelerate import PartialState

    if args.result and PartialState().is_main_process:
        write_json_atomic(args.result, {"finished": result.finished, "step": result.step, "losses": result.losses,
                                        "output_dir": str(result.output_dir) if result.output_dir else None,
                                        "processes": PartialState().num_processes, "stamps": stamps})


if __name__ == "__main__":
    main()
