"""Noise schedules, training objectives and samplers for the continuous-image heads.

One :class:`DiffusionSchedule` serves training and sampling, so the two can never disagree about
betas, the prediction type or the timestep range. The betas and the samplers are diffusers
schedulers: ``DDPMScheduler`` defines the training schedule for epsilon / v prediction
(scaled-linear, linear or cosine betas, optional zero-terminal-SNR rescale), and sampling makes a
fresh ``DDIMScheduler`` or ``EulerDiscreteScheduler`` from that same config (schedulers keep
per-run state, so each sampling run gets its own). ``prediction="flow"`` uses rectified flow
(``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, timestep ``1000 s``) sampled by
``FlowMatchEulerDiscreteScheduler``.

Loss math runs in fp32 whatever the autocast dtype: noise, noised inputs, targets and the MSE.
Classifier-free guidance is one batched call on a conditional/unconditional pair:
``out = uncond + scale * (cond - uncond)`` on the model output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PREDICTIONS = ("epsilon", "v_prediction", "flow")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SAMPLERS = ("ddim", "euler", "flow")
MAX_TRAIN_STEPS = 100_000


def guided(cfg_scale: float | Sequence[float]) -> bool:
    """Whether a sampler call runs conditional and unconditional rows: any row's scale is not 1."""
    return any(scale != 1.0 for scale in (cfg_scale if isinstance(cfg_scale, Sequence) else [cfg_scale]))


@dataclass
class ScheduleConfig:
    """Training schedule and default sampler. Defaults are Orthus's (DDPM scaled-linear betas
    0.00085..0.012, 1000 steps, v-prediction, zero terminal SNR, trailing spacing; DDIM 100 steps).
    ``squaredcos_cap_v2`` is the cosine schedule (Transfusion, MAR)."""

    prediction: str = "v_prediction"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    train_steps: int = 1000
    zero_terminal_snr: bool = True
    timestep_spacing: str = "trailing"
    sampler: str = "ddim"
    sample_steps: int = 100

    def check(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"schedule.prediction {self.prediction!r} is not one of {PREDICTIONS}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule.beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"schedule.sampler {self.sampler!r} is not one of {SAMPLERS}")
        if (self.prediction == "flow") != (self.sampler == "flow"):
            raise ValueError("prediction 'flow' goes with sampler 'flow', and sampler 'flow' only with prediction 'flow'")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError(
                "zero_terminal_snr with epsilon prediction cannot recover x0 at the last timestep; "
                "use prediction v_prediction or set zero_terminal_snr: false"
            )
        if self.train_steps < 1 or self.sample_steps < 1:
            raise ValueError("schedule.train_steps and schedule.sample_steps must be >= 1")
        if self.train_steps > MAX_TRAIN_STEPS:  # the schedulers hold arrays of this length
            raise ValueError(f"schedule.train_steps must be at most {MAX_TRAIN_STEPS:,} (the papers use 1,000), got {self.train_steps:,}")
        if self.sample_steps > self.train_steps:
            raise ValueError(f"schedule.sample_steps ({self.sample_steps:,}) must be at most train_steps ({self.train_steps:,})")


class DiffusionSchedule:
    """The training objective and the samplers of one schedule."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self.config.check()
        self.flow = self.config.prediction == "flow"
        self.steps = self.config.train_steps
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.steps)
        else:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler(
                num_train_timesteps=self.steps,
                beta_start=self.config.beta_start,
                beta_end=self.config.beta_end,
                beta_schedule=self.config.beta_schedule,
                prediction_type=self.config.prediction,
                rescale_betas_zero_snr=self.config.zero_terminal_snr,
                timestep_spacing=self.config.timestep_spacing,
                clip_sample=False,
            )
        self._tables: dict[tuple[str, int], StepTable] = {}

    # ------------------------------------------------------------------ training

    def sample_timesteps(self, n: int, device: torch.device, max_t: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform timesteps, per row at most ``max_t`` (noise limiting), as float32 ``[n]``.

        DDPM timesteps are integers in ``[0, max_t]``; flow timesteps are ``1000 * sigma`` with
        sigma in ``(0, max_t / 1000]``.
        """
        limit = torch.full((n,), float(self.steps - 1 if not self.flow else self.steps), device=device)
        if max_t is not None:
            limit = torch.minimum(limit, max_t.to(device, torch.float32))
        u = torch.rand(n, device=device)
        if self.flow:
            return (1.0 - u) * limit  # (0, limit]: sigma 0 would train nothing
        return torch.floor(u * (limit + 1)).clamp(max=limit)

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) broadcast to ``like``; flow: (1 - s, s)."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        if self.flow:
            sigma = (t.float() / self.steps).view(shape)
            return 1.0 - sigma, sigma
        alpha_bar = self.scheduler.alphas_cumprod.to(like.device)[t.long()].view(shape)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._alphas(t, x0)
        return a * x0.float() + s * noise.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return noise.float() - x0.float()
        if self.config.prediction == "epsilon":
            return noise.float()
        a, s = self._alphas(t, x0)
        return a * noise.float() - s * x0.float()

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-row MSE (mean over the feature dimensions), in fp32."""
        per_value = F.mse_loss(prediction.float(), self.target(x0, noise, t), reduction="none")
        return per_value.flatten(1).mean(1)

    # ------------------------------------------------------------------ sampling

    def sampler(self, steps: int | None = None):
        """A fresh sampling scheduler built from the training config, timesteps set."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

        kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "flow": FlowMatchEulerDiscreteScheduler}
        scheduler = kind[self.config.sampler].from_config(self.scheduler.config)
        scheduler.set_timesteps(steps or self.config.sample_steps)
        return scheduler

    def steps_of(self, count: int) -> StepTable:
        """The sampler's ``count`` steps as a :class:`StepTable` (made once per step count).

        Every sampler here is deterministic and first order (DDIM with eta 0, Euler without churn,
        flow Euler), so a step is ``x_next = keep * x + take * out`` and its model input is
        ``scale_in * x``, with numbers that depend on the step only. They are read off the diffusers
        scheduler by stepping it on probe rows, so diffusers stays the definition of each sampler,
        and rows with different step counts then share one tensor operation per step."""
        key = (self.config.sampler, count)
        if key not in self._tables:
            self._tables[key] = _probe(self.sampler(count))
        return self._tables[key]

    @torch.no_grad()
    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        *,
        cfg_scale: float | Sequence[float] = 1.0,
        steps: int | None | Sequence[int | None] = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        device: torch.device | str = "cpu",
        on_step: Callable[[], None] | None = None,
        plan: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from pure noise of ``shape`` (``[B, ...]``) to x0.

        ``cfg_scale``, ``steps`` and ``generator`` may be one per row, so that requests with
        different settings share each model call: rows with fewer steps finish early and keep
        their result (riding along at their last timestep) while the others go on, and each row's
        noise depends on its own generator only (a row samples the same alone as in any batch).

        ``on_step`` is called before every step: a caller's deadline check, which may raise to
        stop the loop. ``plan`` is called once, before the first step, with the timesteps ``t`` that
        each step will pass to ``denoise``, so that it can precompute what depends on them alone
        (:meth:`~unimodal.models.heads.ConditionedHead.plan`).

        ``denoise(x_t, t)`` returns the model output for inputs ``[R, ...]`` and timesteps ``[R]``.
        When any row is guided (:func:`guided`) it is called with ``R = 2B`` rows (the same
        ``x_t`` twice: the conditional half first) and the output is guided; otherwise ``R = B``.
        """
        from diffusers.utils.torch_utils import randn_tensor

        rows = shape[0]
        per_row = [count or self.config.sample_steps for count in (steps if isinstance(steps, Sequence) else [steps] * rows)]
        tables = [self.steps_of(count) for count in per_row]  # made once per step count
        longest = max(len(table.timesteps) for table in tables)
        # [steps, rows] tables of every row's numbers; a finished row keeps its x (keep 1, take 0)
        own = [table.padded(longest) for table in tables]
        timesteps, scale_in, keep, take = (torch.stack(column, 1).to(device) for column in zip(*own))
        scales = torch.tensor(list(cfg_scale) if isinstance(cfg_scale, Sequence) else [cfg_scale] * rows, device=device)
        mix = bool((scales != 1.0).any())
        generators = list(generator) if isinstance(generator, Sequence) else generator
        # Euler keeps x in sigma units (scaled in and out); DDIM and flow use x_t as it is
        sigma = torch.tensor([table.init_noise_sigma for table in tables], device=device)
        x = randn_tensor(shape, generator=generators, device=torch.device(device)).to(device) * _rows(sigma, len(shape))
        passed = [torch.cat([t, t]) if mix else t for t in timesteps]  # what each step passes to denoise
        if plan is not None:
            plan(passed)
        scale = _rows(scales, len(shape))
        for k, t in enumerate(passed):
            if on_step is not None:
                on_step()
            x_in = x * _rows(scale_in[k], len(shape))
            if mix:
                x_in = torch.cat([x_in, x_in])
            out = denoise(x_in, t).float()
            if mix:
                cond, uncond = out.chunk(2)
                out = torch.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
            x = torch.addcmul(x * _rows(keep[k], len(shape)), out, _rows(take[k], len(shape)))
        return x


@dataclass(frozen=True)
class StepTable:
    """One sampler run of a step count as numbers: at step ``k`` the model gets ``scale_in[k] * x``
    at ``timesteps[k]``, and ``x`` becomes ``keep[k] * x + take[k] * out``; the run starts from
    noise times ``init_noise_sigma``."""

    timesteps: torch.Tensor
    scale_in: torch.Tensor
    keep: torch.Tensor
    take: torch.Tensor
    init_noise_sigma: float

    def padded(self, steps: int) -> tuple[torch.Tensor, ...]:
        """The four columns extended to ``steps``: past its end a row rides along at its last
        timestep and keeps its ``x``."""
        extra = steps - len(self.timesteps)
        return (
            torch.cat([self.timesteps, self.timesteps[-1:].expand(extra)]),
            torch.cat([self.scale_in, torch.ones(extra)]),
            torch.cat([self.keep, torch.ones(extra)]),
            torch.cat([self.take, torch.zeros(extra)]),
        )


def _probe(scheduler: Any) -> StepTable:
    """Read a sampler's per-step numbers by stepping it on three probe rows: ``x = 1, out = 0``
    gives ``keep``, ``x = 0, out = 1`` gives ``take``, and ``x = out = 1`` checks that the step is
    linear (a stochastic or clipping sampler is refused rather than approximated)."""
    x = torch.tensor([[1.0], [0.0], [1.0]])
    out = torch.tensor([[0.0], [1.0], [1.0]])
    scale_in, keep, take = [], [], []
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x[:1], t) if hasattr(scheduler, "scale_model_input") else x[:1]
        scale_in.append(float(scaled[0, 0]))
        prev = scheduler.step(out, t, x).prev_sample[:, 0].double()
        if not torch.isclose(prev[2], prev[0] + prev[1], rtol=1e-5, atol=1e-6):
            raise ValueError(f"{type(scheduler).__name__} does not take linear steps; the batched sampler needs a deterministic first-order one")
        keep.append(float(prev[0]))
        take.append(float(prev[1]))
    return StepTable(
        scheduler.timesteps.float().cpu(), torch.tensor(scale_in), torch.tensor(keep), torch.tensor(take),
        float(getattr(scheduler, "init_noise_sigma", 1.0)),
    )


def _rows(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-row numbers ``[B]`` shaped to broadcast over ``[B, ...]``."""
    return values.view(-1, *[1] * (ndim - 1))
