"""CUDA-only paths on the tiny model: mixed-precision training with validation samples, LoRA in bf16,
and the compiled sampling pipeline. Skipped without a GPU (CI has none); run on a GPU machine with
`pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    from atelier.cli.demo_data import write_demo_photos
    from atelier.models.dreambooth.base import model_hash
    from atelier.models.dreambooth.config import load_train_config
    from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
    from atelier.models.dreambooth.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("gpu")
    base = write_tiny_model(root / "tiny")
    photos = write_demo_photos(root / "photos", count=5)[0].parent
    spec = PriorSpec(model_hash(base), "a photo of toy", 4, 64, 0, "dpmsolver++", 4, 5.0)
    priors = ensure_class_priors(root / "priors", spec, base).path
    return base, photos, priors, load_train_config(ROOT / "configs" / "dreambooth" / "tiny.yaml")


def _train(cfg, gpu_setup, work: Path):
    from atelier.models.dreambooth.trainer import TrainInputs, train

    base, photos, priors, _ = gpu_setup
    return train(cfg, TrainInputs(base, photos, "toy", work, work / "pipeline", priors))


def test_fp16_training_writes_validation_samples(gpu_setup, tmp_path):
    cfg = gpu_setup[3].model_copy(update={"max_train_steps": 4, "validation_steps": 2, "mixed_precision": "fp16"})
    result = _train(cfg, gpu_setup, tmp_path)
    assert result.finished and all(np.isfinite(result.losses))
    assert len(list(result.validation_dirs[0].glob("*.png"))) == len(cfg.validation_prompts)


def test_lora_bf16_compiled_trains_and_fuses(gpu_setup, tmp_path):
    from atelier.models.dreambooth.config import LoraConfig

    cfg = gpu_setup[3].model_copy(
        update={"max_train_steps": 4, "validation_steps": 2, "mixed_precision": "bf16", "lora": LoraConfig(rank=4), "compile_unet": True}
    )
    result = _train(cfg, gpu_setup, tmp_path)
    assert result.finished and all(np.isfinite(result.losses))
    assert (result.output_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (result.output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_cuda_graph_step_follows_the_eager_loss_curve_and_resumes(gpu_setup, tmp_path):
    """The captured step trains as the eager one does (same draws, same update), and a captured run
    checkpointed mid-way resumes onto the same curve."""
    from atelier.models.dreambooth.trainer import uses_cuda_graphs

    cfg = gpu_setup[3].model_copy(
        update={
            "max_train_steps": 12,
            "validation_steps": 6,
            "checkpointing_steps": 100,
            "mixed_precision": "bf16",
            "lr_scheduler": "linear",
            "lr_warmup_steps": 2,
        }
    )
    assert uses_cuda_graphs(cfg, "bf16", 1) and not uses_cuda_graphs(cfg.model_copy(update={"cuda_graphs": False}), "bf16", 1)
    graphs = _train(cfg, gpu_setup, tmp_path / "graphs")
    eager = _train(cfg.model_copy(update={"cuda_graphs": False}), gpu_setup, tmp_path / "eager")
    assert graphs.timings["capture"] > 0 and eager.timings["capture"] == 0
    assert graphs.losses == pytest.approx(eager.losses, rel=2e-2)
    assert len(list(graphs.validation_dirs[0].glob("*.png"))) == len(cfg.validation_prompts)  # sampling between replays
    from atelier.models.dreambooth.trainer import TrainInputs, train

    base, photos, priors, _ = gpu_setup
    inputs = TrainInputs(base, photos, "toy", tmp_path / "resume", tmp_path / "resume" / "pipeline", priors)
    first = train(cfg, inputs, step_budget=7)
    resumed = train(cfg, inputs)
    assert not first.finished and resumed.resumed_from == 7 and resumed.finished
    assert resumed.losses == pytest.approx(graphs.losses, rel=2e-2)


def test_compiled_resident_session_follows_the_eager_curve_and_compiles_once(gpu_setup, tmp_path):
    """The resident trainer's session compiles the UNet and text encoder inside the captured step and
    computes with the bf16 weight copies: it trains on the eager loss curve, the second subject of the
    session compiles nothing more, and the pipeline it writes is float32 (the copies never leak)."""
    import torch._dynamo

    from atelier.models.dreambooth.trainer import TrainerSession, TrainInputs, train

    base, photos, priors, _ = gpu_setup
    cfg = gpu_setup[3].model_copy(
        update={"max_train_steps": 10, "validation_steps": 5, "checkpointing_steps": 100, "mixed_precision": "bf16"}
    )
    eager = train(
        cfg.model_copy(update={"cuda_graphs": False}), TrainInputs(base, photos, "toy", tmp_path / "e", tmp_path / "e" / "p", priors)
    )
    torch._dynamo.reset()
    session = TrainerSession(cfg, base, keep=True, compile=True)
    try:
        assert session.compiled
        runs = []
        for name in ("a", "b"):
            result = session.run(cfg, TrainInputs(base, photos, "toy", tmp_path / name, tmp_path / name / "p", priors))
            runs.append(result)
            if name == "a":
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs > 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        for result in runs:
            assert result.finished and result.losses == pytest.approx(eager.losses, rel=3e-2)
        from safetensors.torch import load_file

        weights = load_file(runs[1].output_dir / "unet" / "diffusion_pytorch_model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
    finally:
        session.close()
        torch._dynamo.reset()


def test_a_single_run_writes_the_weights_it_staged_in_its_checkpoints_buffers(gpu_setup, tmp_path):
    """The end of a captured run stages the trained weights into the host buffers its checkpoints pinned
    and writes the pipeline from them: the files hold exactly the weights on the device, in float32."""
    from safetensors.torch import load_file

    from atelier.models.dreambooth.trainer import TrainerSession, TrainInputs

    base, photos, priors, _ = gpu_setup
    cfg = gpu_setup[3].model_copy(
        update={"max_train_steps": 12, "checkpointing_steps": 6, "validation_steps": 100, "mixed_precision": "bf16"}
    )
    session = TrainerSession(cfg, base)
    try:
        result = session.run(cfg, TrainInputs(base, photos, "toy", tmp_path, tmp_path / "p", priors))
        assert result.finished and result.timings["save_staging"] > 0
        weights = {k: b for k, b in session.checkpoint_buffers.items() if k.startswith("/models/")}
        assert weights and all(b.is_pinned() for b in weights.values())  # (the loop's CPU RNG state is not a device tensor)
        for part, module in (("unet", session.m.unet), ("text_encoder", session.m.text_encoder)):
            name = "diffusion_pytorch_model" if part == "unet" else "model"
            written = load_file(result.output_dir / part / f"{name}.safetensors")
            on_device = getattr(module, "_orig_mod", module).state_dict()
            assert {t.dtype for t in written.values()} == {torch.float32}
            assert all(torch.equal(written[k], on_device[k].cpu()) for k in written), part
    finally:
        session.close()


def test_validation_replays_one_captured_unet_forward_that_reads_the_current_weights(gpu_setup):
    """A captured run's validation samples: the UNet's forward captured once with the bf16 weight copies,
    the same images as the eager loop, and a replay after the weights change samples the new weights."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from atelier.models.dreambooth.sampling import GenerationRequest, load_pipeline
    from atelier.models.dreambooth.steps import ComputeCopies
    from atelier.models.dreambooth.validation import ValidationSampler

    base = gpu_setup[0]
    pipe = load_pipeline(base, dtype=torch.float32)
    copies = ComputeCopies([pipe.unet, pipe.text_encoder], torch.bfloat16)

    def sampler(capture: bool) -> ValidationSampler:
        return ValidationSampler(
            pipe.unet,
            pipe.text_encoder,
            pipe.vae,
            CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
            DDPMScheduler.from_pretrained(str(base), subfolder="scheduler").config,
            lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False),
            copies.call,
            capture=capture,
        )

    requests = [GenerationRequest("a sks toy in the jungle", 1, 6, 5.0), GenerationRequest("a sks toy", 2, 6, 5.0)]

    def pixels(images):
        return np.stack([np.asarray(i, dtype=int) for i in images])

    captured = sampler(True)
    first = pixels(captured.images(requests, "dpmsolver++", 2))
    assert len(captured.captured) == 1  # one graph, replayed for every step
    assert np.abs(first - pixels(sampler(False).images(requests, "dpmsolver++", 2))).max() <= 2
    with torch.no_grad():
        for master in copies.masters:
            master.mul_(0.9)
    copies.refresh()  # as the training step does after its update
    again = pixels(captured.images(requests, "dpmsolver++", 2))
    assert len(captured.captured) == 1 and np.abs(again - first).max() > 10
    assert np.abs(again - pixels(sampler(False).images(requests, "dpmsolver++", 2))).max() <= 2


def _copied_models(seed: int):
    """A channels-last Conv2d and a Linear (weights and biases copied to bf16) and a LayerNorm (float32,
    outside the copies, as autocast keeps norms), on the GPU; the same weights for a seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(40 * 8 * 8, 4099))
    norm = torch.nn.LayerNorm(4099)
    model[0].to(memory_format=torch.channels_last)
    return model.cuda(), norm.cuda()


def _four_passes_or_one(one_pass: bool, steps: int, grad_scale: float):
    """`steps` updates from the same drawn gradients (a backward's convolution gradients are not bit-reproducible,
    and Adam turns the sign of a near-zero gradient into a whole step), one way or the other."""
    from atelier.models.dreambooth.one_pass_adamw import OnePassAdamW
    from atelier.models.dreambooth.steps import ComputeCopies, clip_into_optimizer, init_adam_state

    model, norm = _copied_models(0)
    params = [*model.parameters(), *norm.parameters()]
    opt = torch.optim.AdamW(params, lr=torch.tensor(3e-3, device="cuda"), weight_decay=1e-2, fused=True, capturable=True)
    init_adam_state(opt)
    copies = ComputeCopies([model], torch.bfloat16)
    update = OnePassAdamW.for_step(opt, copies) if one_pass else None
    assert (update is not None) == one_pass
    g = torch.Generator("cuda").manual_seed(1)
    for _ in range(steps):
        for copy in copies.copies:  # as a backward leaves them: bf16, laid out like the weight
            copy.grad = torch.empty_like(copy).copy_(torch.randn(copy.shape, device="cuda", generator=g) * grad_scale)
        for p in norm.parameters():
            p.grad = torch.randn(p.shape, device="cuda", generator=g) * grad_scale
        if update is not None:
            update(1.0)
        else:
            copies.gradients_to_masters()
            clip_into_optimizer(opt, params, 1.0)
            opt.step()
            copies.refresh()
        opt.zero_grad(set_to_none=True)
    return params, opt, copies


@pytest.mark.parametrize("grad_scale", [1e-6, 1.0])  # clipping idle, clipping every step
def test_one_pass_adamw_is_fused_adamw_with_clipping_and_refreshes_the_copies(grad_scale):
    """The one-pass kernel's weights, moments and step counters are fused AdamW's (up to float rounding),
    clipped as clip_grad_norm_ clips; the bf16 copies are the new weights rounded; no float32 gradient is
    kept for a copied weight."""
    pytest.importorskip("triton")
    four, opt4, _ = _four_passes_or_one(False, 4, grad_scale)
    one, opt1, copies = _four_passes_or_one(True, 4, grad_scale)
    for a, b in zip(one, four):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
        for key in ("exp_avg", "exp_avg_sq"):  # within float rounding of the largest (a moment near zero is a difference of two)
            x, y = opt1.state[a][key], opt4.state[b][key]
            assert (x - y).abs().max() <= 1e-5 * y.abs().max(), key
        assert float(opt1.state[a]["step"]) == float(opt4.state[b]["step"]) == 4
    assert all(torch.equal(c, m.to(torch.bfloat16)) for c, m in zip(copies.copies, copies.masters))
    assert all(m.grad is None for m in copies.masters) and all(c.grad is None for c in copies.copies)
    start, _ = _copied_models(0)
    moved = max((a - b).abs().max().item() for a, b in zip(one, start.parameters()))
    assert moved > 1e-3  # it trained


def _autocast_group_norm(x, w, b, groups, act):
    """What an eager step under bf16 autocast computes: GroupNorm in float32 on the cast input, SiLU in float32,
    then the next layer's cast to bf16."""
    y = torch.nn.functional.group_norm(x.float(), groups, w, b, 1e-6)
    return torch.nn.functional.silu(y) if act else y


@pytest.mark.parametrize(
    "shape,act",
    [
        ((2, 320, 64, 64), True),
        ((2, 960, 32, 32), True),
        ((2, 640, 32, 32), False),
        ((2, 2560, 8, 8), True),
        ((1, 96, 5, 7), True),
        ((2, 32, 16, 16), True),
    ],
)
def test_fused_group_norm_is_autocast_group_norm_and_silu(shape, act):
    """The fused kernels against torch under autocast's rules, on SD 1.5's layer shapes (a group of 10 to 80
    channels, 64 to 4,096 pixels, split over programs or not) and odd ones: the output is the float32 result rounded
    to bf16 (within one bf16 step where the statistics' rounding tips it), and the gradients agree."""
    from atelier.models.dreambooth.fused_norm import _GroupNormAct

    g = torch.Generator("cuda").manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.randn(c, device="cuda", generator=g) * 0.3 + 1).requires_grad_()
    b = (torch.randn(c, device="cuda", generator=g) * 0.3).requires_grad_()
    dy = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16).to(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    fused = _GroupNormAct.apply(xs[0], w, b, 32, 1e-6, act)
    assert fused.dtype == torch.bfloat16 and fused.is_contiguous(memory_format=torch.channels_last)
    fused.backward(dy)
    fused_grads = [xs[0].grad, w.grad.clone(), b.grad.clone()]
    w.grad = b.grad = None
    exact = _autocast_group_norm(xs[1], w, b, 32, act)
    exact.to(torch.bfloat16).backward(dy)
    rounded = exact.detach().to(torch.bfloat16)
    assert (fused == rounded).float().mean() > 0.99
    # one bf16 step at each value, and float32 rounding of the statistics where SiLU's output is near zero
    step = exact.detach().abs() * 2**-7 + 1e-5
    assert ((fused.float() - exact.detach()).abs() <= step).all()
    for got, want in zip(fused_grads, [xs[1].grad, w.grad, b.grad]):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()


@pytest.mark.parametrize("shape", [(32, 320, 64, 64), (16, 640, 32, 32), (2, 128, 256, 256), (1, 96, 5, 7)])
def test_fused_group_norm_in_fp16_is_the_float32_result_rounded(shape):
    """The sampler's case (fp16 weights and activations, no autocast; SD 1.5's UNet at the class-image batch and
    a VAE decoder layer with 4 channels a group): the output is torch's float32 GroupNorm + SiLU rounded to fp16
    once, within one fp16 step where the statistics' rounding tips it."""
    from atelier.models.dreambooth.fused_norm import FusedGroupNorm

    g = torch.Generator("cuda").manual_seed(1)
    c = shape[1]
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.5).half().to(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(32, c, eps=1e-6).cuda().half()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, device="cuda", generator=g) * 0.3 + 1)
        norm.bias.copy_(torch.randn(c, device="cuda", generator=g) * 0.3)
        exact = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-6))
        norm.__class__, norm.act = FusedGroupNorm, True
        fused = norm(x)
    assert fused.dtype == torch.float16 and fused.is_contiguous(memory_format=torch.channels_last)
    assert (fused == exact.half()).float().mean() > 0.99
    assert ((fused.float() - exact).abs() <= exact.abs() * 2**-10 + 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 4096, 2 * 1280), (2, 77, 2 * 640), (3, 5, 2)])
def test_fused_geglu_is_the_float32_gate_rounded_and_so_is_its_gradient(shape, dtype):
    """GEGLU's kernels against x * gelu(g) and its gradient in float32 from the same half-precision inputs (SD 1.5's
    largest gate at the class-image batch, a small one, a single element): each result that float32 value rounded
    once, within one step where erf's float32 rounding tips it."""
    from atelier.models.dreambooth.fused_geglu import _Geglu

    g = torch.Generator("cuda").manual_seed(1)
    h = (torch.randn(shape, device="cuda", generator=g) * 2).to(dtype).requires_grad_(True)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", generator=g).to(dtype)
    y = _Geglu.apply(h)
    (dh,) = torch.autograd.grad(y, h, dy)
    exact_h = h.detach().float().requires_grad_(True)
    x, gate = exact_h.chunk(2, dim=-1)
    exact = x * torch.nn.functional.gelu(gate)
    (exact_dh,) = torch.autograd.grad(exact, exact_h, dy.float())
    step = 2**-10 if dtype == torch.float16 else 2**-7
    for got, want in ((y, exact.detach()), (dh, exact_dh)):
        assert got.dtype == dtype and got.shape == want.shape
        assert (got == want.to(dtype)).float().mean() > 0.98
        assert ((got.float() - want).abs() <= want.abs() * step + 1e-6).all()


def test_the_fp16_sampler_with_fused_norms_makes_the_images_torch_norms_make(gpu_setup):
    """`load_pipeline(fused_norms=True)` on CUDA (fused GroupNorms, channels_last, UNet and VAE decoder) against
    torch's norms (`fused_norms=False`) on the same seeds: the same pictures up to rounding."""
    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline

    base = gpu_setup[0]
    fused = load_pipeline(base, fused_norms=True)
    assert type(fused.unet.conv_norm_out).__name__ == "FusedGroupNorm" and fused.unet.dtype == torch.float16
    assert type(fused.vae.decoder.conv_norm_out).__name__ == "FusedGroupNorm"
    requests = [GenerationRequest("a photo of toy", seed, 8, 5.0, 64, 64) for seed in range(4)]
    plain = generate(load_pipeline(base, fused_norms=False), requests, batch_size=4)
    for a, b in zip(plain, generate(fused, requests, batch_size=4)):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.mean() < 2.0, f"fused-norm images drift from torch's: mean |diff| {diff.mean():.2f}/255"


def test_fused_kernels_train_a_unet_as_autocast_does():
    """A whole UNet with its GroupNorms and GEGLU gates fused (and its transformers' output kept channels_last),
    against the same UNet as diffusers runs it under bf16 autocast: the same loss and gradients up to bf16
    rounding."""
    import copy

    from diffusers import UNet2DConditionModel

    from atelier.models.dreambooth.fused_norm import fuse_kernels

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=2, sample_size=32, norm_num_groups=32, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).cuda().to(memory_format=torch.channels_last).train()  # fmt: skip
    fused = copy.deepcopy(unet)
    assert fuse_kernels(fused) == 31 + 6  # the GroupNorms, then one GEGLU per transformer block
    g = torch.Generator("cuda").manual_seed(1)
    x, cond = torch.randn(2, 4, 32, 32, device="cuda", generator=g), torch.randn(2, 7, 64, device="cuda", generator=g)
    results = []
    for model in (unet, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x, torch.tensor([10, 500], device="cuda"), encoder_hidden_states=cond).sample.float() ** 2).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(loss, rel=2e-3)
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).norm() <= 3e-2 * grad.norm() + 1e-12, name


def test_async_checkpoint_is_whole_and_loads_back(tmp_path):
    from atelier.models.dreambooth.checkpoints import AsyncCheckpointer, latest_checkpoint, load_checkpoint

    weights = {"w": torch.randn(1024, 1024, device="cuda"), "steps": torch.tensor(3, device="cuda")}
    buffers: dict = {}
    ckpt = AsyncCheckpointer(tmp_path, keep=1, buffers=buffers)
    ckpt.reserve({"models": weights, "loop": {"step": 0}})
    ckpt.reserved()
    pinned = dict(buffers)
    assert len(pinned) == 2 and all(b.is_pinned() for b in pinned.values())  # copies off the device at the bus's speed
    ckpt.save(1, {"models": weights, "loop": {"step": 1}})
    weights["w"].add_(1.0)  # training goes on while the copy is written
    ckpt.save(2, {"models": weights, "loop": {"step": 2}})
    ckpt.wait()
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000002" and len(list((tmp_path / "checkpoints").iterdir())) == 1
    back = load_checkpoint(latest_checkpoint(tmp_path))
    assert back["loop"]["step"] == 2 and torch.equal(back["models"]["w"], weights["w"].cpu())
    assert all(buffers[k] is b for k, b in pinned.items())  # both checkpoints copied into the reserved buffers


@pytest.mark.parametrize("mode", ["reduce-overhead"])
def test_compiled_sampling_matches_eager(gpu_setup, mode):
    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline

    base = gpu_setup[0]
    requests = [GenerationRequest("a photo of toy", seed, 8, 5.0, 64, 64) for seed in range(4)]
    eager = generate(load_pipeline(base, fused_norms=False), requests, batch_size=4)  # torch's own kernels, as compiled
    fast = generate(load_pipeline(base, compile_mode=mode), requests + requests[:2], batch_size=4)[:4]  # a short last batch is padded
    assert len(generate(load_pipeline(base, compile_mode=mode), requests + requests[:2], batch_size=4)) == 6
    for a, b in zip(eager, fast):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.mean() < 2.0, f"compiled ({mode}) images drift from eager: mean |diff| {diff.mean():.2f}/255"


def test_glm_models_run_on_cuda_in_bf16_and_match_the_cpu_reading(tmp_path):
    """GLM-OCR and the local GLM-4.1V judge pick CUDA and bf16 on their own; greedy readings of the
    tiny random models agree with fp32 on the CPU for the first tokens (bf16 may differ later)."""
    from atelier.models.ocr.glm import GlmOcr
    from atelier.models.vlm.local import LocalJudge
    from tests.tiny_glm import build_tiny_glm4v, build_tiny_glm_ocr

    rng = np.random.default_rng(0)
    lines = [rng.integers(0, 255, (48, 160, 3), dtype=np.uint8), np.full((32, 300, 3), 255, np.uint8)]
    weights = build_tiny_glm_ocr(tmp_path / "ocr")
    gpu = GlmOcr(weights, batch_size=2)
    assert gpu.vlm.model.device.type == "cuda" and gpu.vlm.model.dtype == torch.bfloat16
    read = gpu.read_lines(lines, "en")
    assert len(read) == 2 and all(0.0 < x.confidence <= 1.0 for x in read)
    cpu = GlmOcr(weights, device="cpu", batch_size=2).read_lines(lines, "en")
    assert [x.text[:1] for x in read] == [x.text[:1] for x in cpu]
    judge = LocalJudge(build_tiny_glm4v(tmp_path / "judge"))
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(lines[0]).save(buf, format="PNG")
    answer = judge.ask([buf.getvalue(), buf.getvalue()], "Does this image show a toy? Answer yes or no.")
    assert judge.vlm.model.device.type == "cuda" and answer.first_token_logprobs and not judge.calibrated


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_training_task_launches_accelerate_with_one_process_per_gpu(gpu_setup, tmp_path):
    """train_processes: 2 on a 2-GPU node: accelerate launch --multi_gpu (NCCL) trains as one GPU with the whole batch."""
    from atelier.models.dreambooth.launch import train_launched
    from atelier.models.dreambooth.trainer import TrainInputs

    base, photos, priors, cfg = gpu_setup
    common = {
        "max_train_steps": 8,
        "validation_steps": 1000,
        "checkpointing_steps": 1000,
        "mixed_precision": "no",
        "lr_scheduler": "linear",
    }
    single = _train(cfg.model_copy(update={**common, "train_batch_size": 2}), gpu_setup, tmp_path / "one")
    lines: list[str] = []
    launched = train_launched(
        cfg.model_copy(update={**common, "train_batch_size": 1}),
        TrainInputs(base, photos, "toy", tmp_path / "ddp", tmp_path / "ddp" / "pipeline", priors),
        2,
        lines.append,
    )
    assert "trained 8 steps with 2 processes" in lines, lines[-20:]
    assert launched.finished and (launched.output_dir / "model_index.json").is_file()
    assert launched.losses == pytest.approx(single.losses, rel=2e-2)


def test_the_live_training_run_samples_the_gpu(tmp_path, monkeypatch):
    """MLflow's system metrics in the run that training reports to include the GPU (nvidia-ml-py)."""
    import time

    pytest.importorskip("mlflow", reason="a bare GPU host without the platform's MLflow client")
    pytest.importorskip("pynvml", reason="nvidia-ml-py samples the GPU")
    from mlflow import MlflowClient

    from atelier.kernel.settings import Settings
    from atelier.registry.training_run import TrainingRun

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    settings = Settings(workspace=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = {"atelier.customer": "gpu", "atelier.subject": "live", "atelier.training.key": "k"}
    run = TrainingRun.open(settings, "gpu", "live", tags, {"steps": 3})
    x = torch.randn(4096, 4096, device="cuda")
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 4:
        step += 1
        run.log(step, float((x @ x).mean()), 1e-4)
    torch.cuda.synchronize()
    run.close()
    metrics = MlflowClient(settings.resolved_tracking_uri).get_run(run.run_id).data.metrics
    assert any(k.startswith("system/gpu_0_") for k in metrics), sorted(metrics)
