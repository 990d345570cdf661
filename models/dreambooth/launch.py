"""Entry point for multi-process training, one process per GPU (DDP):

    accelerate launch --multi_gpu --num_processes N -m models.dreambooth.launch --config ... --base ...
    torchrun --standalone --nproc_per_node N -m models.dreambooth.launch ...   (also on CPU, with gloo)

Every process runs this module; the main process writes the result JSON. `train_launched` is how the
training task starts it (setting `train_processes` > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

import yaml

from atelier.kernel.errors import AtelierError
from atelier.kernel.storage import write_json_atomic, write_text_atomic
from atelier.models.dreambooth.config import TrainConfig, load_train_config
from atelier.models.dreambooth.trainer import TrainInputs, TrainResult, train


class LaunchFailed(AtelierError):
    """The multi-process training run exited with an error."""


def launch_command(processes: int, args: list[str], gpu: bool) -> list[str]:
    """One process per GPU with DDP over NCCL: `accelerate launch --multi_gpu`. Without GPUs, CPU
    processes over gloo through torchrun (accelerate's own `--cpu` starts a single process)."""
    with socket.socket() as sock:  # a free rendezvous port, so two trainings on one node do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    module = ["-m", "atelier.models.dreambooth.launch", *args]
    if not gpu:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(processes),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            *module,
        ]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        *module,
    ]


def train_launched(cfg: TrainConfig, inputs: TrainInputs, processes: int, on_line: Callable[[str], None] = lambda _l: None) -> TrainResult:
    """Train with `processes` processes (see `launch_command`; the config's precision is kept: the
    trainer passes it to Accelerator itself). Returns what `train` returns."""
    import torch

    work = Path(inputs.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config, result = work / "launch-config.yaml", work / "launch-result.json"
    write_text_atomic(config, yaml.safe_dump(cfg.model_dump(mode="json")))
    result.unlink(missing_ok=True)
    args = [
        "--config",
        str(config),
        "--base",
        str(inputs.base_model),
        "--instance",
        str(inputs.instance_dir),
        "--class-noun",
        inputs.class_noun,
        "--work",
        str(work),
        "--result",
        str(result),
    ]
    if inputs.class_dir is not None:
        args += ["--class-dir", str(inputs.class_dir)]
    if inputs.class_latents is not None:
        args += ["--class-latents", str(inputs.class_latents)]
    cmd = launch_command(processes, args, gpu=torch.cuda.is_available())
    tail: deque[str] = deque(maxlen=30)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            on_line(line.rstrip())
    if proc.returncode != 0 or not result.is_file():
        raise LaunchFailed(
            f"training with {processes} processes",
            f"exited with code {proc.returncode}:\n" + "\n".join(tail),
            "read the lines above; a rerun resumes from the last checkpoint",
        )
    data = json.loads(result.read_text())
    return TrainResult(
        data["finished"],
        data["step"],
        data["losses"],
        Path(data["output_dir"]) if data["output_dir"] else None,
        data.get("resumed_from"),
        data.get("seconds", 0.0),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True, help="training YAML")
    ap.add_argument("--overrides", default="{}", help="JSON object of config keys to override")
    ap.add_argument("--base", type=Path, required=True, help="diffusers SD directory")
    ap.add_argument("--instance", type=Path, required=True, help="folder of subject photos")
    ap.add_argument("--class-dir", type=Path, default=None, help="folder of class-prior images")
    ap.add_argument("--class-latents", type=Path, default=None, help="folder where the class images' latents are kept")
    ap.add_argument("--class-noun", required=True)
    ap.add_argument("--work", type=Path, required=True, help="checkpoints; the pipeline goes to WORK/pipeline")
    ap.add_argument("--step-budget", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    ap.add_argument("--result", type=Path, default=None, help="write steps, losses and the output path here")
    args = ap.parse_args(argv)
    cfg = load_train_config(args.config, json.loads(args.overrides))
    inputs = TrainInputs(args.base, args.instance, args.class_noun, args.work, args.work / "pipeline", args.class_dir, args.class_latents)
    stamps: dict[int, float] = {}  # step -> time its loss was read back (for throughput)
    started = time.perf_counter()
    result = train(cfg, inputs, step_budget=args.step_budget, on_progress=lambda step, *_: stamps.__setitem__(step, time.time()))
    from accelerate import PartialState

    if args.result and PartialState().is_main_process:
        write_json_atomic(
            args.result,
            {
                "finished": result.finished,
                "step": result.step,
                "losses": result.losses,
                "output_dir": str(result.output_dir) if result.output_dir else None,
                "processes": PartialState().num_processes,
                "stamps": stamps,
                "resumed_from": result.resumed_from,
                "seconds": time.perf_counter() - started,
            },
        )
        print(f"trained {result.step} steps with {PartialState().num_processes} processes", flush=True)


if __name__ == "__main__":
    main()
