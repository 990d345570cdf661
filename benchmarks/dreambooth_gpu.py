"""DreamBooth training and class-image generation: Atelier against diffusers' example, same run.

    python benchmarks/dreambooth_gpu.py                 # SD 1.5 architecture, random weights, 512 px (needs CUDA)
    python benchmarks/dreambooth_gpu.py --tiny --steps 10 --warmup 10  # the tiny model on CPU: checks the script runs
    python benchmarks/dreambooth_gpu.py --e2e            # the whole job, wall clock (benchmarks/dreambooth_e2e.py)

Training: 1 instance + 1 prior image per step, text encoder trained, prior preservation, constant LR.
The baseline follows examples/dreambooth/train_dreambooth.py (fp16 autocast with a GradScaler, VAE
encode and text encoder inside the loop, AdamW with its default foreach kernel). Atelier's trainer is
called as the flow calls it. Steps/s is measured after warm-up steps; memory is the allocator's peak
reserved bytes per phase. Class images: StableDiffusionPipeline as the example calls it (fp16, the
model's PNDM scheduler, 50 steps, batch 4) against Atelier's generation (DPM-Solver++, larger
batches, batched classifier-free guidance, optionally compiled with CUDA graphs), the same count and
size; warmup_s is the first batch's time, compile included. LoRA rows train rank-4 adapters (peft).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.cli.demo_data import draw_robot  # noqa: E402
from atelier.models.dreambooth.config import LoraConfig, TrainConfig  # noqa: E402
from atelier.models.dreambooth.trainer import TrainInputs, train  # noqa: E402


def build_sd15(out: Path, bpe: Path | None) -> Path:
    """Stable Diffusion 1.5's exact architecture with random weights, saved as a diffusers directory."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from atelier.models.dreambooth.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=512,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    tok_dir = write_clip_tokenizer(Path(tempfile.mkdtemp()), bpe)
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    print(
        f"SD1.5-shape model: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M parameters",
        flush=True,
    )
    return out


def write_images(folder: Path, count: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_robot(seed + i, size).save(folder / f"{i:03d}.png")
    return folder


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else float("nan")


def example_models(base: Path, cfg: TrainConfig, device: str) -> dict:
    """What diffusers' train_dreambooth.py builds: fp32 UNet and text encoder (trained), the VAE in
    fp16 on CUDA, foreach AdamW and a GradScaler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    fp16 = device == "cuda"
    text = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder").to(device)
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae").to(device, torch.float16 if fp16 else torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet").to(device)
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    unet.train()
    text.train()
    return {
        "text": text,
        "vae": vae,
        "unet": unet,
        "sched": DDPMScheduler.from_pretrained(str(base), subfolder="scheduler"),
        "params": params,
        "opt": opt,
        "scaler": torch.amp.GradScaler(device, enabled=fp16),
        "device": device,
        "fp16": fp16,
    }


def example_step(m: dict, pixels: torch.Tensor, ids: torch.Tensor, cfg: TrainConfig) -> float:
    """One step of the example's loop: VAE encode and text encoder every step, fp16 autocast, the loss
    read back (the example logs it every step)."""
    import torch.nn.functional as F

    device, vae, sched = m["device"], m["vae"], m["sched"]
    with torch.autocast(device, dtype=torch.float16, enabled=m["fp16"]):
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), device=device)
        pred = m["unet"](sched.add_noise(latents, noise, t), t, m["text"](ids)[0]).sample
        p, pp = pred.float().chunk(2)
        n, nn_ = noise.float().chunk(2)
        loss = F.mse_loss(p, n) + cfg.prior_loss_weight * F.mse_loss(pp, nn_)
    scaler, opt = m["scaler"], m["opt"]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(m["params"], cfg.max_grad_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return loss.detach().item()


def example_ids(base: Path, cfg: TrainConfig, device: str) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    return tok(
        [cfg.fill(cfg.instance_prompt, "toy"), cfg.fill(cfg.class_prompt, "toy")],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def baseline_training(base: Path, instance: Path, klass: Path, cfg: TrainConfig, steps: int, warmup: int, device: str) -> dict:
    """The loop of diffusers' train_dreambooth.py, reduced to what runs per step."""
    from atelier.models.dreambooth.images import stack_folder

    _reset_memory(device)
    m = example_models(base, cfg, device)
    inst, cls = stack_folder(instance, cfg.resolution), stack_folder(klass, cfg.resolution)
    ids = example_ids(base, cfg, device)
    times = []
    for step in range(warmup + steps):
        example_step(m, torch.stack([inst[step % len(inst)], cls[step % len(cls)]]), ids, cfg)
        times.append(time.perf_counter())
    timed = times[-1] - times[warmup - 1]
    out = {"steps_per_s": steps / timed, "ms_per_step": 1000 * timed / steps, "peak_gib": _peak_gib(device)}
    del m
    return out


def atelier_training(base: Path, instance: Path, klass: Path, cfg: TrainConfig, steps: int, warmup: int, device: str, work: Path) -> dict:
    _reset_memory(device)
    try:
        return _atelier_training(base, instance, klass, cfg, steps, warmup, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the budget's checkpoint (12 GB at SD 1.5) must not pile up row after row
        torch._dynamo.reset()  # a compiled row's graphs and CUDA-graph pools must not weigh on the next row's memory
        _reset_memory(device)


def _atelier_training(base: Path, instance: Path, klass: Path, cfg: TrainConfig, steps: int, warmup: int, work: Path) -> dict:
    stamps: dict[int, float] = {}
    total = cfg.max_train_steps

    def progress(step, _total, _loss, _lr):
        stamps[step] = time.perf_counter()

    shutil.rmtree(work, ignore_errors=True)
    train(
        cfg.model_copy(update={"max_train_steps": total}),
        TrainInputs(base, instance, "toy", work, work / "out", klass),
        on_progress=progress,
        step_budget=warmup + steps,
    )
    timed = stamps[warmup + steps] - stamps[warmup]
    return {
        "steps_per_s": steps / timed,
        "ms_per_step": 1000 * timed / steps,
        "peak_gib": _peak_gib("cuda" if torch.cuda.is_available() else "cpu"),
    }


def profile_trainer(base: Path, instance: Path, klass: Path, cfg: TrainConfig, steps: int, work: Path, out: Path) -> None:
    """Where a training step's GPU time goes: the top kernels by self CUDA time over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    train(cfg, TrainInputs(base, instance, "toy", work, work / "out", klass), step_budget=10)  # warm-up, loads, caches
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train(cfg, TrainInputs(base, instance, "toy", work, work / "out", klass), step_budget=steps)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    out.write_text(table)
    print(table, flush=True)


def class_images(
    base: Path,
    count: int,
    size: int,
    device: str,
    baseline: bool,
    compile_mode: str = "none",
    steps: int = 25,
    batch: int = 16,
    layout: bool = False,
    cudnn_benchmark: bool = False,
) -> dict:
    from diffusers import StableDiffusionPipeline

    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline

    _reset_memory(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    dtype = torch.float16 if device == "cuda" else torch.float32
    if baseline:
        pipe = StableDiffusionPipeline.from_pretrained(str(base), dtype=dtype, safety_checker=None, requires_safety_checker=False).to(
            device
        )
        pipe.set_progress_bar_config(disable=True)

        def run(n):
            return [
                pipe(["a photo of toy"] * min(4, n - i), num_inference_steps=50, height=size, width=size).images  # noqa: F821 (del below)
                for i in range(0, n, 4)
            ]
    else:
        pipe = load_pipeline(base, "dpmsolver++", compile_mode=compile_mode)
        if layout:  # what compile_mode default does before compiling, left eager: fused QKV, channels_last
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)

        def run(n):
            return generate(pipe, [GenerationRequest("a photo of toy", i, steps, 7.5, size, size) for i in range(n)], batch_size=batch)  # noqa: F821 (`del pipe` below frees it after the last run)

    w0 = time.perf_counter()
    run(min(count, 4 if baseline else batch))  # warm-up (and compile)
    warmup = time.perf_counter() - w0
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(count)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del pipe
    return {"images_per_s": count / seconds, "seconds": seconds, "warmup_s": warmup, "peak_gib": _peak_gib(device)}


def scaling(base: Path, instance: Path, klass: Path, cfg: TrainConfig, gpus: int, steps: int, warmup: int, tmp: Path) -> dict:
    """Steps/s and images/s of Atelier's trainer on 1 and on `gpus` GPUs (torchrun, DDP), batch 1 + 1 per GPU."""
    import os
    import subprocess

    import yaml

    config = tmp / "scaling.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    out = {}
    for n in sorted({1, gpus}):
        result = tmp / f"scaling-{n}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            "-m",
            "atelier.models.dreambooth.launch",
            "--config",
            str(config),
            "--base",
            str(base),
            "--instance",
            str(instance),
            "--class-dir",
            str(klass),
            "--class-noun",
            "toy",
            "--work",
            str(tmp / f"scaling-work-{n}"),
            "--step-budget",
            str(warmup + steps),
            "--result",
            str(result),
        ]
        done = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            out[n] = {"error": (done.stderr or done.stdout)[-1500:]}
            print(f"{n} GPU(s): failed\n{out[n]['error']}", flush=True)
            continue
        stamps = {int(k): v for k, v in json.loads(result.read_text())["stamps"].items()}
        rate = steps / (stamps[warmup + steps] - stamps[warmup])
        per_step = 2 * cfg.train_batch_size * n  # instance + prior images per optimizer step
        out[n] = {"steps_per_s": rate, "images_per_s": rate * per_step, "processes": n}
        print(f"{n} GPU(s): {rate:.2f} steps/s, {rate * per_step:.2f} images/s", flush=True)
    if all("images_per_s" in out.get(n, {}) for n in (1, gpus)):
        speedup = out[gpus]["images_per_s"] / out[1]["images_per_s"]
        print(
            f"scaling {gpus} GPUs vs 1: {speedup:.2f}x images/s (efficiency {speedup / gpus:.0%}); "
            f"effective batch {gpus}x larger, same LR (see README: multi-GPU)",
            flush=True,
        )
    return out


def check_graphs(base: Path, instance: Path, klass: Path, cfg: TrainConfig, steps: int, tmp: Path) -> dict:
    """Same seed, same steps: the CUDA-graph trainer must follow the eager one's loss curve."""
    eager = train(
        cfg.model_copy(update={"mixed_precision": "bf16"}),
        TrainInputs(base, instance, "toy", tmp / "eager", tmp / "eager" / "out", klass),
        step_budget=steps,
    )
    graphs = train(
        cfg.model_copy(update={"mixed_precision": "bf16", "compile_unet": True, "compile_mode": "reduce-overhead"}),
        TrainInputs(base, instance, "toy", tmp / "graphs", tmp / "graphs" / "out", klass),
        step_budget=steps,
    )
    rel = max(abs(a - b) / abs(a) for a, b in zip(eager.losses, graphs.losses))
    print(
        f"eager  {[round(x, 4) for x in eager.losses]}\ngraphs {[round(x, 4) for x in graphs.losses]}\n"
        f"max relative loss difference over {steps} steps: {rel:.4f}",
        flush=True,
    )
    return {"eager": eager.losses, "graphs": graphs.losses, "max_rel_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny model at 64 px (CPU smoke run)")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--images", type=int, default=32, help="class images per generation variant")
    ap.add_argument("--bpe", type=Path, default=None, help="CLIP BPE file (default: the one open_clip_torch ships)")
    ap.add_argument("--only", default="", help="comma list of variants to run (default all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--check-graphs", action="store_true", help="instead of the table: eager vs CUDA-graph loss curves")
    ap.add_argument("--gpus", type=int, default=0, help="instead of the table: Atelier's trainer on 1 and on N GPUs (DDP)")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="instead of the table: profile Atelier's bf16 trainer and write the top CUDA kernels here",
    )
    ap.add_argument("--tmp", type=Path, default=None, help="work folder (default: a new temporary one); the built model is reused")
    ap.add_argument("--e2e", action="store_true", help="instead of the table: the whole job, wall clock (benchmarks/dreambooth_e2e.py)")
    ap.add_argument("--e2e-rows", default="", help="comma list of e2e rows (default: baseline, atelier cold, atelier warm (priors cached))")
    ap.add_argument("--e2e-results", type=Path, default=None, help="e2e results accumulate here (rows may run in several commands)")
    ap.add_argument("--class-images", type=int, default=200)
    ap.add_argument("--e2e-steps", type=int, default=800)
    ap.add_argument("--e2e-subjects", type=int, default=8, help="subjects of the resident row (atelier back to back)")
    ap.add_argument("--e2e-row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e-base", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e-instance", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e-tmp", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e-size", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.e2e_row:  # one e2e row, in the fresh process run_all started
        from benchmarks.dreambooth_e2e import run_row

        run_row(
            args.e2e_row,
            args.e2e_base,
            args.e2e_instance,
            args.e2e_tmp,
            args.class_images,
            args.e2e_steps,
            args.e2e_size,
            args.json,
            args.e2e_subjects,
        )
        return
    from atelier.models.dreambooth.trainer import LOSS_READBACK_STEPS

    if args.warmup % LOSS_READBACK_STEPS or args.steps % LOSS_READBACK_STEPS:
        ap.error(f"--warmup and --steps must be multiples of {LOSS_READBACK_STEPS}: the trainer reads losses back in bursts")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from atelier.models.dreambooth.tiny import write_tiny_model

        base, size = write_tiny_model(tmp / "tiny"), 64
    elif (tmp / "sd15" / "model_index.json").is_file():  # built by an earlier command with the same --tmp
        base, size = tmp / "sd15", 512
    else:
        base, size = build_sd15(tmp / "sd15", args.bpe), 512
    instance = write_images(tmp / "instance", 5, size, 1000)
    if args.e2e:
        from benchmarks.dreambooth_e2e import ROWS, print_table, run_all

        rows = [r.strip() for r in args.e2e_rows.split(",") if r.strip()] or list(ROWS[:3])
        results = args.e2e_results or tmp / "e2e.json"
        print_table(run_all(rows, base, instance, tmp, args.class_images, args.e2e_steps, size, results, args.e2e_subjects))
        return
    klass = write_images(tmp / "class", 10, size, 2000)
    cfg = TrainConfig(resolution=size, max_train_steps=10_000, checkpointing_steps=10_000, validation_steps=10_000, learning_rate=5e-6)
    if args.check_graphs:
        result = check_graphs(base, instance, klass, cfg, args.steps, tmp)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    if args.gpus:
        result = scaling(base, instance, klass, cfg.model_copy(update={"mixed_precision": "bf16"}), args.gpus, args.steps, args.warmup, tmp)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    if args.profile:
        profile_trainer(base, instance, klass, cfg.model_copy(update={"mixed_precision": "bf16"}), args.steps, tmp / "prof", args.profile)
        return
    variants = {
        "baseline (diffusers example: fp16 + GradScaler, foreach AdamW)": lambda: baseline_training(
            base, instance, klass, cfg, args.steps, args.warmup, device
        ),
        "atelier default (bf16, whole step as a CUDA graph)": lambda: atelier_training(
            base, instance, klass, cfg, args.steps, args.warmup, device, tmp / "w0"
        ),
        "atelier fp16 (cached latents, fused AdamW, channels_last)": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "fp16" if device == "cuda" else "no"}),
            args.steps,
            args.warmup,
            device,
            tmp / "w1",
        ),
        "atelier bf16 eager": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "cuda_graphs": False}),
            args.steps,
            args.warmup,
            device,
            tmp / "w2",
        ),
        "atelier bf16 + torch.compile": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "compile_unet": True}),
            args.steps,
            args.warmup,
            device,
            tmp / "w3",
        ),
        "atelier bf16 + torch.compile reduce-overhead (CUDA graphs)": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "compile_unet": True, "compile_mode": "reduce-overhead"}),
            args.steps,
            args.warmup,
            device,
            tmp / "w6",
        ),
        "atelier bf16 + torch.compile, text encoder frozen": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "compile_unet": True, "train_text_encoder": False}),
            args.steps,
            args.warmup,
            device,
            tmp / "w5",
        ),
        "atelier LoRA r4 bf16": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "lora": LoraConfig(rank=4), "learning_rate": 1e-4}),
            args.steps,
            args.warmup,
            device,
            tmp / "w7",
        ),
        "atelier LoRA r4 bf16 + torch.compile": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "lora": LoraConfig(rank=4), "learning_rate": 1e-4, "compile_unet": True}),
            args.steps,
            args.warmup,
            device,
            tmp / "w8",
        ),
        "atelier bf16, text encoder frozen": lambda: atelier_training(
            base,
            instance,
            klass,
            cfg.model_copy(update={"mixed_precision": "bf16", "train_text_encoder": False}),
            args.steps,
            args.warmup,
            device,
            tmp / "w4",
        ),
        "class images baseline (PNDM 50 steps, batch 4)": lambda: class_images(base, args.images, size, device, True),
        "class images atelier (DPM-Solver++ 25, batch 16)": lambda: class_images(base, args.images, size, device, False),
        "class images atelier, DPM-Solver++ 20 (the default)": lambda: class_images(base, args.images, size, device, False, steps=20),
        "class images atelier, DPM-Solver++ 20, fused QKV + channels_last": lambda: class_images(
            base, args.images, size, device, False, steps=20, layout=True
        ),
        "class images atelier, DPM-Solver++ 20, cuDNN benchmark": lambda: class_images(
            base, args.images, size, device, False, steps=20, cudnn_benchmark=True
        ),
        "class images atelier + torch.compile": lambda: class_images(base, args.images, size, device, False, "default"),
        "class images atelier + CUDA graphs (reduce-overhead)": lambda: class_images(
            base, args.images, size, device, False, "reduce-overhead"
        ),
        "class images atelier + CUDA graphs, DPM-Solver++ 20 steps": lambda: class_images(
            base, args.images, size, device, False, "reduce-overhead", steps=20
        ),
        "class images atelier + CUDA graphs, batch 32": lambda: class_images(
            base, args.images, size, device, False, "reduce-overhead", batch=32
        ),
    }
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    if only:  # a ratio needs its baseline: the chosen rows' baselines run too
        only += ["baseline (diffusers example", "class images baseline"]
    opt_in = {"atelier bf16 + torch.compile reduce-overhead"}  # minutes of compiling: run it with --only reduce-overhead
    results = {}
    for name, run in variants.items():
        if only and not any(o in name for o in only):
            continue
        if not only and any(o in name for o in opt_in):
            continue
        if args.tiny and "compile" in name:
            continue
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001 - one failed variant should not hide the others
            results[name] = {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    base_train = results.get("baseline (diffusers example: fp16 + GradScaler, foreach AdamW)", {})
    base_gen = results.get("class images baseline (PNDM 50 steps, batch 4)", {})
    print(f"\n{'variant':<66} {'steps/s':>8} {'ms/step':>8} {'img/s':>7} {'peak GiB':>9} {'ratio':>6}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<66} {r['error']}")
            continue
        if "steps_per_s" in r:
            ratio = f"{r['steps_per_s'] / base_train['steps_per_s']:.2f}x" if "steps_per_s" in base_train else "n/a"
            print(f"{name:<66} {r['steps_per_s']:>8.2f} {r['ms_per_step']:>8.1f} {'':>7} {r['peak_gib']:>9.1f} {ratio:>6}")
        else:
            ratio = f"{r['images_per_s'] / base_gen['images_per_s']:.2f}x" if "images_per_s" in base_gen else "n/a"
            print(f"{name:<66} {'':>8} {'':>8} {r['images_per_s']:>7.2f} {r['peak_gib']:>9.1f} {ratio:>6}")
    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
