"""Schedules, samplers with guidance, the diffusion head and the input/output adapters."""

from __future__ import annotations

import pytest
import torch

from unimodal.models.adapters import SoftVQ, build_patch_adapters
from unimodal.models.diffusion import DiffusionSchedule, ScheduleConfig, _probe
from unimodal.models.heads import DiffusionHead

FLOW = ScheduleConfig(prediction="flow", sampler="flow", zero_terminal_snr=False, sample_steps=20)
COSINE_EPS = ScheduleConfig(prediction="epsilon", beta_schedule="squaredcos_cap_v2", zero_terminal_snr=False,
                            timestep_spacing="leading", sample_steps=50)


def test_training_math_matches_diffusers():
    schedule = DiffusionSchedule()  # Orthus: scaled-linear, v-prediction, zero terminal SNR
    assert schedule.scheduler.alphas_cumprod[-1] == 0
    x0, noise = torch.randn(6, 5), torch.randn(6, 5)
    t = torch.tensor([0, 10, 250, 500, 998, 999])
    ref = schedule.scheduler
    torch.testing.assert_close(schedule.noised(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(schedule.target(x0, noise, t), ref.get_velocity(x0, noise, t))
    eps = DiffusionSchedule(COSINE_EPS)
    torch.testing.assert_close(eps.target(x0, noise, t), noise)
    flow = DiffusionSchedule(FLOW)
    s = torch.tensor([0.5])
    torch.testing.assert_close(flow.noised(x0[:1], noise[:1], s * 1000), 0.5 * x0[:1] + 0.5 * noise[:1])
    torch.testing.assert_close(flow.target(x0, noise, t.float()), noise - x0)


def test_timesteps_respect_noise_limits():
    torch.manual_seed(0)
    for config in (ScheduleConfig(), FLOW):
        schedule = DiffusionSchedule(config)
        limit = torch.where(torch.arange(4000) % 2 == 0, 500.0, float("inf"))
        t = schedule.sample_timesteps(4000, torch.device("cpu"), limit)
        assert t[::2].max() <= 500 and t[1::2].max() > 900 and t.min() >= 0
        assert t.dtype == torch.float32


def test_bad_schedule_configs_are_refused():
    with pytest.raises(ValueError, match="cannot recover x0"):
        DiffusionSchedule(ScheduleConfig(prediction="epsilon", zero_terminal_snr=True))
    with pytest.raises(ValueError, match="goes with sampler 'flow'"):
        DiffusionSchedule(ScheduleConfig(prediction="flow", zero_terminal_snr=False))
    with pytest.raises(ValueError, match="not one of"):
        DiffusionSchedule(ScheduleConfig(sampler="heun"))
    with pytest.raises(ValueError, match=r"sample_steps \(2,000\) must be at most train_steps \(1,000\)"):
        DiffusionSchedule(ScheduleConfig(sample_steps=2000))


def oracle(schedule: DiffusionSchedule, x0: torch.Tensor):
    """The model output that is exactly right for data ``x0``, given x_t and t."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target = x0.repeat(len(x_t) // len(x0), *([1] * (x0.ndim - 1)))
        a, s = schedule._alphas(t, x_t)
        noise = (x_t - a * target) / s
        return schedule.target(target, noise, t)

    return denoise


@pytest.mark.parametrize(
    "config",
    [ScheduleConfig(sample_steps=20), ScheduleConfig(sampler="euler", sample_steps=20), COSINE_EPS, FLOW],
    ids=["ddim-v-zsnr", "euler-v-zsnr", "ddim-eps-cosine", "flow"],
)
def test_samplers_reach_the_data_with_a_perfect_model(config):
    schedule = DiffusionSchedule(config)
    x0 = torch.randn(3, 4)
    out = schedule.sample(oracle(schedule, x0), (3, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "config",
    [ScheduleConfig(sample_steps=20), ScheduleConfig(sampler="euler", sample_steps=20), COSINE_EPS, FLOW],
    ids=["ddim-v-zsnr", "euler-v-zsnr", "ddim-eps-cosine", "flow"],
)
def test_rows_with_their_own_step_counts_sample_as_diffusers_does_alone(config):
    """The batched sampler against each row run alone through the diffusers scheduler's own loop,
    with a model that is not an oracle (its output depends on x and t nonlinearly)."""
    schedule = DiffusionSchedule(config)
    weight = torch.randn(4, 4) / 2

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t @ weight + t[:, None] / 1000)

    counts = [None, 7, 3, None]
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    batched = schedule.sample(denoise, (4, 4), steps=counts, generator=seeds)
    for row, count in enumerate(counts):
        scheduler = schedule.sampler(count)
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(row)) * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(denoise(x_in, t.float().reshape(1)), t, x).prev_sample
        torch.testing.assert_close(batched[row : row + 1], x, atol=1e-4, rtol=1e-4)  # float32 rounding: Euler starts at sigma ~4096


def test_a_stochastic_sampler_is_refused_not_approximated():
    schedule = DiffusionSchedule(ScheduleConfig(sample_steps=5))
    scheduler = schedule.sampler(5)
    original = scheduler.step
    scheduler.step = lambda out, t, x: type("Out", (), {"prev_sample": original(out, t, x).prev_sample + torch.randn_like(x)})()
    with pytest.raises(ValueError, match="does not take linear steps"):
        _probe(scheduler)


def test_guidance_is_one_batched_conditional_unconditional_call():
    schedule = DiffusionSchedule(FLOW)
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    calls = []

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(len(x_t))
        return torch.cat([oracle(schedule, cond)(x_t[:2], t[:2]), oracle(schedule, uncond)(x_t[2:], t[2:])])

    out = schedule.sample(denoise, (2, 4), cfg_scale=3.0, steps=10)
    assert calls == [4] * 10
    # flow outputs are linear in x0, so guidance lands on uncond + 3 * (cond - uncond)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=0)


def test_head_starts_at_zero_and_conditions_on_time_and_hidden_state():
    torch.manual_seed(0)
    head = DiffusionHead(feature_dim=6, cond_dim=10, width=16, depth=2)
    x, t, cond = torch.randn(5, 6), torch.rand(5) * 1000, torch.randn(5, 10)
    assert head(x, t, cond).abs().max() == 0  # adaLN-zero and a zeroed output layer
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (head(x, t, cond) - x).pow(2).mean().backward()
        optimizer.step()
    out = head(x, t, cond)
    assert out.abs().max() > 0
    assert not torch.allclose(out, head(x, t + 300, cond))
    assert not torch.allclose(out, head(x, t, cond + 1))


def test_conditioned_head_matches_the_head_planned_or_not():
    torch.manual_seed(0)
    head = DiffusionHead(feature_dim=6, cond_dim=10, width=16, depth=2)
    for parameter in head.parameters():  # past adaLN-zero, so every modulation matters
        torch.nn.init.normal_(parameter, std=0.3)
    cond = torch.randn(4, 10)
    schedule = DiffusionSchedule(ScheduleConfig(prediction="flow", sampler="flow", zero_terminal_snr=False, sample_steps=6))
    with torch.no_grad():
        seen = []
        conditioned = head.conditioned(cond)
        x, t = torch.randn(4, 6), torch.rand(4) * 1000
        torch.testing.assert_close(conditioned(x, t), head(x, t, cond))  # unplanned timesteps

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(t)
            return head(x_t, t, cond)

        # two guided rows with different step counts: the plan holds every step's timesteps
        settings = {"cfg_scale": [2.0, 1.0], "steps": [6, 4], "generator": [torch.Generator().manual_seed(s) for s in (1, 2)]}
        plain = schedule.sample(denoise, (2, 6), **settings)
        planned = head.conditioned(cond)
        planned.PLAN_CHUNK = 4  # two chunks
        made = []
        modulations = planned.modulations
        planned.modulations = lambda t: made.append(len(t)) or modulations(t)
        settings["generator"] = [torch.Generator().manual_seed(s) for s in (1, 2)]
        out = schedule.sample(planned, (2, 6), plan=planned.plan, **settings)
    assert len(seen) == 6 and made == [4, 2] and not planned.ready and not planned.upcoming
    torch.testing.assert_close(out, plain)


def test_orthus_head_size():
    with torch.device("meta"):
        head = DiffusionHead(feature_dim=256, cond_dim=4096, width=1536, depth=3)
    millions = sum(p.numel() for p in head.parameters()) / 1e6
    assert 45 < millions < 55, millions  # the paper: about 50M


def test_soft_vq_mixes_embedding_rows_by_distance():
    torch.manual_seed(0)
    vq = SoftVQ(feature_dim=4, codebook_size=8)
    rows = torch.randn(8, 16)
    v = torch.randn(5, 4)
    d = torch.cdist(v, vq.codebook.detach()) ** 2
    expected = torch.softmax(-d, -1) @ rows
    torch.testing.assert_close(vq(v, rows), expected, atol=1e-4, rtol=1e-4)
    # a cold softmax picks the nearest code's row: the hard VQ as a limit
    cold = SoftVQ(4, 8, temperature=1e-4)
    cold.codebook.data.copy_(vq.codebook.data)
    torch.testing.assert_close(cold(v, rows), rows[d.argmin(-1)])
    vq(v, rows).sum().backward()
    assert vq.codebook.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        SoftVQ(4, 8, temperature=0)


@pytest.mark.parametrize("kind", ["linear", "unet"])
def test_patch_adapters_shapes_and_timestep_conditioning(kind):
    torch.manual_seed(0)
    adapter_in, adapter_out = build_patch_adapters(kind, feature_dim=48, hidden_size=32, patch=4,
                                                   channels=[8, 16, 16], groups=4)
    tokens, t = torch.randn(2, 16, 48), torch.tensor([10.0, 900.0])
    embeds, skips = adapter_in(tokens, t)
    assert embeds.shape == (2, 16, 32)
    other, _ = adapter_in(tokens, t.flip(0))
    assert not torch.allclose(embeds, other)
    out = adapter_out(embeds, t, skips)
    assert out.shape == (2, 16, 48)
    # every patch reaches the output through the hidden states
    out.sum().backward()
    assert all(p.grad is not None for p in adapter_in.parameters())


def test_unet_adapter_needs_power_of_two_patches():
    with pytest.raises(ValueError, match="power-of-two"):
        build_patch_adapters("unet", feature_dim=27, hidden_size=8, patch=3, channels=[4, 4], groups=2)
    with pytest.raises(ValueError, match="not 'linear' or 'unet'"):
        build_patch_adapters("conv", feature_dim=12, hidden_size=8, patch=2, channels=None, groups=2)
