"""DreamBooth trainer on the tiny model: resume continues the uninterrupted run exactly."""

import os

import pytest
import torch
from safetensors.torch import load_file

from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
from atelier.models.dreambooth.trainer import TrainInputs, latest_checkpoint, train


@pytest.fixture(scope="module")
def prior_dir(tiny_model, tmp_path_factory):
    spec = PriorSpec(model_hash(tiny_model), "a photo of toy", 4, 64, 0, "dpmsolver++", 4, 5.0)
    return ensure_class_priors(tmp_path_factory.mktemp("priors"), spec, tiny_model).path


def _inputs(tiny_model, photos, prior_dir, work):
    return TrainInputs(tiny_model, photos[0].parent, "toy", work, work / "pipeline", prior_dir)


def _weights(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_continues_the_loss_curve_exactly(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(
        update={
            "max_train_steps": 12,
            "gradient_accumulation_steps": 2,
            "checkpointing_steps": 100,
            "validation_steps": 100,
            "lr_scheduler": "linear",
            "lr_warmup_steps": 2,
        }
    )
    straight = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "a"))
    first = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "b"), step_budget=5)
    assert not first.finished and first.step == 5 and first.output_dir is None
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000005"
    resumed = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "b"))
    assert resumed.resumed_from == 5 and resumed.finished
    assert resumed.losses == straight.losses  # same RNG stream, optimizer, LR schedule
    a, b = _weights(straight.output_dir), _weights(resumed.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_changes_weights_and_frozen_text_encoder_stays(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(
        update={
            "max_train_steps": 4,
            "train_text_encoder": False,
            "validation_steps": 2,
            "checkpointing_steps": 1,
            "checkpoints_total_limit": 2,
        }
    )
    result = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "w"))
    base_unet, new_unet = _weights(tiny_model), _weights(result.output_dir)
    assert any(not torch.equal(base_unet[k], new_unet[k]) for k in base_unet)
    te = "text_encoder/model.safetensors"
    assert (tiny_model / te).read_bytes() == (result.output_dir / te).read_bytes() or all(
        torch.equal(load_file(str(tiny_model / te))[k], v) for k, v in load_file(str(result.output_dir / te)).items()
    )
    # total limit honoured; none for the last step (the finished run wrote its pipeline)
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["checkpoint-0000002", "checkpoint-0000003"]
    assert [p.name for p in result.validation_dirs] == ["step-0000002"]  # every N steps, not at the end
    assert len(list(result.validation_dirs[0].glob("*.png"))) == len(cfg.validation_prompts)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_prior_preservation_needs_class_images(tiny_model, photos, tmp_path, tiny_config):
    with pytest.raises(ValueError, match="class_dir"):
        train(tiny_config, TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path, tmp_path / "o", None))


def test_gradient_checkpointing_keeps_the_numbers(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    """Recomputing activations trades time for memory; the losses must not change."""
    cfg = tiny_config.model_copy(update={"max_train_steps": 3, "validation_steps": 100, "checkpointing_steps": 100})
    plain = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "plain"))
    ckpt = train(cfg.model_copy(update={"gradient_checkpointing": True}), _inputs(tiny_model, photos, prior_dir, tmp_path / "gc"))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_bf16_mixed_precision_runs_on_cpu(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(update={"max_train_steps": 2, "mixed_precision": "bf16", "validation_steps": 100})
    result = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "bf16"))
    assert result.finished and all(torch.isfinite(torch.tensor(result.losses)))
    assert load_file(str(result.output_dir / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"].dtype == torch.float32


def test_lora_trains_adapters_only_and_fuses_them_into_the_output(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    from diffusers import StableDiffusionPipeline

    from atelier.models.dreambooth.config import LoraConfig

    cfg = tiny_config.model_copy(
        update={"max_train_steps": 6, "lora": LoraConfig(rank=4), "validation_steps": 3, "checkpointing_steps": 100, "learning_rate": 1e-2}
    )
    straight = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "a"))
    out = straight.output_dir
    adapters = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") and "lora" in k for k in adapters)
    assert any(k.startswith("text_encoder.") for k in adapters)  # train_text_encoder: adapters there too
    base, fused = _weights(tiny_model), _weights(out)
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)  # only targets
    # the output is a plain pipeline: it loads without peft and without the adapter file
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(v.numel() for v in base.values())
    # a LoRA run resumes exactly like a full one
    train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "b"), step_budget=4)
    resumed = train(cfg, _inputs(tiny_model, photos, prior_dir, tmp_path / "b"))
    assert resumed.resumed_from == 4 and resumed.losses == straight.losses


def test_adam_state_made_up_front_trains_as_the_lazy_one():
    """The CUDA-graph path creates AdamW's state before the first step (so it never lands in blocks
    that activations freed); the updates must be the ones AdamW makes when it creates the state itself."""
    from atelier.models.dreambooth.steps import init_adam_state

    torch.manual_seed(0)
    a = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    b = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2) for m in (a, b))
    init_adam_state(opt_b)
    assert opt_b.state[b.weight]["exp_avg"].stride() == b.weight.stride()
    x = torch.randn(2, 4, 9, 9)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_checkpoint_keeps_layouts(tmp_path):
    """Host copies keep each tensor's strides: a channels_last moment loaded back contiguous is refused
    by the fused optimizer."""
    from atelier.models.dreambooth.checkpoints import AsyncCheckpointer, latest_checkpoint, load_checkpoint

    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    ckpt = AsyncCheckpointer(tmp_path, keep=1)
    ckpt.reserve({"w": w})
    ckpt.save(1, {"w": w, "loop": {"step": 1}})
    ckpt.wait()
    back = load_checkpoint(latest_checkpoint(tmp_path))["w"]
    assert back.stride() == w.stride() and torch.equal(back, w)


def test_a_checkpoint_copies_into_the_buffers_reserved_for_it(tmp_path):
    """`reserve` allocates the host buffers in the background (the trainer starts it once the captured
    step replays) and `reserved` waits for them; the checkpoint then copies into those buffers instead of
    allocating its own, and holds the values of its step, not later ones."""
    from atelier.models.dreambooth.checkpoints import AsyncCheckpointer, latest_checkpoint, load_checkpoint

    buffers: dict = {}
    w = torch.randn(64, 64)
    ckpt = AsyncCheckpointer(tmp_path, keep=1, buffers=buffers)
    ckpt.reserve({"w": w})
    ckpt.reserved()
    reserved = dict(buffers)
    assert [b.shape for b in reserved.values()] == [w.shape]
    ckpt.save(1, {"w": w, "loop": {"step": 1}})
    saved = w.clone()
    w.add_(1.0)  # training goes on
    ckpt.wait()
    assert all(buffers[k] is b for k, b in reserved.items())
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["w"], saved)


def test_the_end_of_a_run_stages_its_weights_in_the_checkpoints_buffers(tiny_model, tmp_path):
    """A single run that writes its pipeline at the end copies the trained weights into the host buffers its
    checkpoints reserved (already pinned on a GPU, free once the last checkpoint is on disk), found by the
    checkpoint's name for each tensor; a tensor no checkpoint holds goes to new memory of its own. The host
    modules built around the copies hold the run's weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from atelier.models.dreambooth.checkpoints import AsyncCheckpointer, LoopState, checkpoint_state
    from atelier.models.dreambooth.handoff import HostWeights

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder").requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    buffers: dict = {}
    ckpt = AsyncCheckpointer(tmp_path, keep=1, buffers=buffers)
    ckpt.reserve(checkpoint_state(LoopState(0), {"unet": unet}, optimizer, scheduler, None))
    ckpt.reserved()
    reserved = dict(buffers)
    built = HostWeights(dict(buffers), pin=False).stage({"unet": unet, "text_encoder": text})
    host_unet, host_text = built["unet"](), built["text_encoder"]()
    for name, p in host_unet.named_parameters():
        assert p.data_ptr() == reserved[f"/models/unet/{name}"].data_ptr(), name  # no copy of its own
    assert torch.equal(host_unet.state_dict()["conv_in.weight"], unet.state_dict()["conv_in.weight"])
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in host_text.state_dict().items())
    assert buffers == reserved  # the frozen text encoder's copies are the run's, not the checkpoints'


def test_compiled_graphs_and_triton_kernels_are_kept_in_the_cache_unless_the_user_chose(tmp_path, monkeypatch):
    from atelier.models.dreambooth.train_setup import keep_compiles

    keep_compiles(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton") and (tmp_path / "cache" / "triton").is_dir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    keep_compiles(tmp_path / "other")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and not (tmp_path / "other" / "triton").exists()


def test_progress_moves_every_step_while_losses_come_back_in_bursts(tiny_model, photos, prior_dir, tmp_path, tiny_config):
    """The bar is fed as each step ends (no device sync), so it never jumps 10 steps at a time and its ETA
    comes from the measured rate; the losses, read back in bursts, still arrive for every step, in order."""
    from atelier.models.dreambooth.trainer import LOSS_READBACK_STEPS

    events = []
    cfg = tiny_config.model_copy(update={"max_train_steps": LOSS_READBACK_STEPS + 3, "checkpointing_steps": 1000, "validation_steps": 1000})
    result = train(
        cfg,
        _inputs(tiny_model, photos, prior_dir, tmp_path),
        on_step=lambda step, total: events.append(("step", step)),
        on_progress=lambda step, total, loss, lr: events.append(("loss", step)),
    )
    steps = [n for kind, n in events if kind == "step"]
    losses = [n for kind, n in events if kind == "loss"]
    assert steps == list(range(1, cfg.max_train_steps + 1)) and losses == steps
    assert result.timings["first_steps"] == LOSS_READBACK_STEPS and result.timings["steady_ms_per_step"] > 0
    # the bar reached step 5 before any loss was read back: it was not held for the burst
    assert events.index(("step", 5)) < events.index(("loss", 1))


def test_steady_pace_leaves_out_the_first_steps_and_what_is_not_a_step(monkeypatch):
    """training.json's steady ms a step is what the steps between read-backs took: the first window (eager
    steps, the capture) is reported apart, and a checkpoint or validation between two read-backs is not
    counted as steps."""
    from atelier.models.dreambooth import pace as pace_module

    clock = iter([0.0, 5.0, 6.0, 100.0, 101.5])  # start, read-back 10, read-back 20, validation done, read-back 30
    monkeypatch.setattr(pace_module.time, "perf_counter", lambda: next(clock))
    pace = pace_module.Pace(0)
    pace.read_back(10)
    pace.read_back(20)
    pace.restart(20)
    pace.read_back(30)
    assert pace.summary() == {"first_steps_s": 5.0, "first_steps": 10.0, "steady_ms_per_step": 125.0, "slowest_window_ms_per_step": 150.0}


def test_cached_class_latents_train_exactly_as_encoding_them_and_a_bad_file_is_encoded_again(
    tiny_model, photos, prior_dir, tmp_path, tiny_config
):
    cfg = tiny_config.model_copy(update={"max_train_steps": 4, "validation_steps": 100, "checkpointing_steps": 100})
    latents = tmp_path / "latents"

    def run(name: str, cache):
        inputs = TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / name, tmp_path / name / "pipeline", prior_dir, cache)
        return train(cfg, inputs)

    plain = run("plain", None)
    first = run("first", latents)
    (stored,) = latents.glob("latents-*.safetensors")
    second = run("second", latents)
    assert (first.timings["class_latents_cached"], second.timings["class_latents_cached"]) == (0.0, 1.0)
    assert plain.losses == first.losses == second.losses
    stored.write_bytes(stored.read_bytes()[:100])  # torn: encoded again, and replaced
    third = run("third", latents)
    assert third.timings["class_latents_cached"] == 0.0 and third.losses == plain.losses
    assert run("fourth", latents).timings["class_latents_cached"] == 1.0
    other = cfg.model_copy(update={"center_crop": not cfg.center_crop})  # another crop: another file, not a wrong hit
    inputs = TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "crop", tmp_path / "crop" / "pipeline", prior_dir, latents)
    assert train(other, inputs).timings["class_latents_cached"] == 0.0
    assert len(list(latents.glob("latents-*.safetensors"))) == 2


def _step_inputs(tiny_model, seed: int):
    """One step's inputs for the tiny model: its noise scheduler, latents, noise, timesteps and token ids."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler")
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return sched, latents, noise, torch.randint(0, 1000, (2,), generator=g), torch.randint(0, 1000, (2, 77), generator=g)


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)


def test_compute_copies_give_autocast_s_numbers_and_fused_clipping_clips_as_torch_does(tiny_model, tiny_config):
    """The captured step's two shortcuts change no number: bf16 weight copies give autocast's loss and
    gradients exactly, and clipping through the fused optimizer's grad_scale updates as clip_grad_norm_ does."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from atelier.models.dreambooth.steps import ComputeCopies, Objective, clip_into_optimizer

    sched, latents, noise, steps, ids = _step_inputs(tiny_model, 0)
    autocast = _bf16_autocast
    runs = []
    for use_copies, fused_clip in ((False, False), (True, True)):
        unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
        text = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
        copies = ComputeCopies([unet, text], torch.bfloat16) if use_copies else None
        params = [p for m in (unet, text) for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
        loss = Objective(unet, text, sched, ids, True, 1.0, autocast, copies.call if copies else None)(latents, noise, steps)
        loss.backward()
        if copies:
            assert len(copies) > 0 and all(m.grad is None for m in copies.masters)  # the copies took the gradients
            copies.gradients_to_masters()
            assert all(c.grad is None for c in copies.copies)  # handed over to the fp32 weights
        grads = [p.grad.clone() for p in params]
        if fused_clip:
            clip_into_optimizer(optimizer, params, 1e-3)  # far below the norm: clipping bites
        else:
            torch.nn.utils.clip_grad_norm_(params, 1e-3)
        optimizer.step()
        if copies:
            copies.refresh()
            assert all(torch.equal(c, m.to(torch.bfloat16)) for c, m in zip(copies.copies, copies.masters))
        runs.append((loss.item(), grads, [p.detach().clone() for p in params]))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(after_a, after_b))


def test_compute_copies_under_torch_compile_are_traced_once_and_leave_the_fp32_weights_in_place(tiny_model):
    """The resident trainer compiles the UNet and text encoder and computes with the bf16 copies: the
    compiled modules see the copies (same loss and gradients as autocast, up to the compiler's rounding),
    a second step reuses the first step's graphs (no recompile: guards see the same dtypes), and after
    each call the layers hold their float32 weights again (what checkpoints and saving read)."""
    import torch._dynamo
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from atelier.models.dreambooth.steps import ComputeCopies, Objective

    sched, latents, noise, steps, ids = _step_inputs(tiny_model, 1)
    autocast = _bf16_autocast

    def parts():
        return (
            UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet"),
            CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder"),
        )

    unet, text = parts()
    reference = Objective(unet, text, sched, ids, True, 1.0, autocast)(latents, noise, steps)
    reference.backward()
    ref_grads = {n: p.grad for n, p in unet.named_parameters()}

    torch._dynamo.reset()
    unet, text = parts()
    compiled_unet, compiled_text = (torch.compile(m, backend="aot_eager", dynamic=False) for m in (unet, text))
    copies = ComputeCopies([compiled_unet, compiled_text], torch.bfloat16)
    objective = Objective(compiled_unet, compiled_text, sched, ids, True, 1.0, autocast, copies.call)
    losses = []
    for _ in range(2):
        loss = objective(latents, noise, steps)
        loss.backward()
        copies.gradients_to_masters()
        losses.append(loss.item())
        if len(losses) == 1:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            grads = {n: p.grad.clone() for n, p in unet.named_parameters()}
        for m in copies.masters:
            m.grad = None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the second step compiled nothing
    assert losses[0] == pytest.approx(reference.item(), rel=1e-2) and losses[1] == losses[0]
    assert all(p.dtype == torch.float32 for p in unet.parameters()) and all(p.dtype == torch.float32 for p in text.parameters())
    trained = [n for n, p in unet.named_parameters() if n in grads and ref_grads[n] is not None]
    assert trained and all(torch.allclose(grads[n], ref_grads[n], rtol=0.1, atol=1e-3) for n in trained)
    torch._dynamo.reset()


@pytest.mark.parametrize("sampler", ["dpmsolver++", "euler", "ddpm"])
def test_validation_sampler_makes_the_pipeline_s_images_from_the_run_s_modules(tiny_model, sampler):
    """Validation samples come from the run's own modules, without a pipeline: the same images as
    StableDiffusionPipeline makes (guided and unguided, a batch split across calls, a negative prompt)."""
    import numpy as np
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline
    from atelier.models.dreambooth.validation import ValidationSampler

    pipe = load_pipeline(tiny_model, sampler, dtype=torch.float32)
    requests = [
        GenerationRequest("a sks toy in the jungle", 3, 4, 5.0),
        GenerationRequest("a sks toy on a beach", 4, 4, 5.0, negative_prompt="blurry"),
        GenerationRequest("a sks toy", 5, 4, 5.0),
        GenerationRequest("a sks toy", 6, 3, 1.0),  # no guidance: a batch of one without the negative half
    ]
    torch.manual_seed(0)  # DDPM's steps draw noise from the global generator
    expected = generate(pipe, requests, batch_size=2)
    torch.manual_seed(0)
    ours = ValidationSampler(
        pipe.unet,
        pipe.text_encoder,
        pipe.vae,
        CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer")),
        DDPMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler").config,  # as the trainer loads it
    ).images(requests, sampler, batch_size=2)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[2]))  # each prompt and seed its own image


def test_the_optimizer_is_torchs_fused_adamw_on_the_cpu_too(tiny_config):
    """The CPU's fused kernel is 1.13x on the whole tiny training (the per-tensor loop was a tenth of each step) and
    steps the same weights: a config that turns it off gets the plain loop."""
    from atelier.models.dreambooth.train_setup import make_optimizer

    def optimizer(cfg):
        return make_optimizer(cfg, [torch.nn.Parameter(torch.ones(3))], torch.device("cpu"), graphs=False)[0]

    fused, plain = optimizer(tiny_config), optimizer(tiny_config.model_copy(update={"fused_adam": False}))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for opt in (fused, plain):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.allclose(fused.param_groups[0]["params"][0], plain.param_groups[0]["params"][0], rtol=0, atol=1e-7)
