"""The first stage of latent diffusion as a loss object (losses.py's contract): LDM's
autoencoder loss (Rombach et al. 2022, App. G; `LPIPSWithDiscriminator` in its code), with
difflab's judge features in place of LPIPS, which needs VGG weights we cannot fetch offline.

    L = |x - x_hat|_1 (or squared) + kl_weight KL(q(z|x) || N(0, I))
        + feature_weight |phi(x) - phi(x_hat)|^2                         (judge features phi)
        + [step >= disc_start] lambda_adapt disc_weight (-D(x_hat))      (hinge generator term)

lambda_adapt = |grad L_rec| / (|grad L_G| + 1e-4) at the decoder's last layer (Esser et al.
2021, "Taming Transformers", eq. 7). The discriminator D (a PatchGAN) learns from the hinge loss
1/2 (relu(1 - D(x)) + relu(1 + D(x_hat))) (Lim & Ye 2017) once per step, with its own AdamW.

Its trainable state is the loss's own (`has_state`): the trainer calls `attach(model, device,
judge)` before the first step, and checkpoints `state_dict()` (restored by `load_state_dict()`
on resume).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.diffusion.loss_base import Loss
from difflab.errors import ConfigError


def kl_diagonal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example (B,), in closed form (Kingma &
    Welling 2014, App. B): 1/2 sum(mean^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017), averaged over patches."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(Loss):
    """Reconstruction + KL (+ judge features) (+ PatchGAN after `disc_start`) for a net with
    `forward(x, eps) -> (x_hat, mean, logvar)`, `latent_shape` and `conv_out` (AutoencoderKL).

    Args:
        cfg: train.autoencoder (AutoencoderLossConfig).
        make_discriminator: image channels -> the PatchGAN (used when cfg.discriminator).
    The trainer calls `attach(model, device, judge)` once before the first step.
    """

    has_state = True  # the discriminator and its optimizer

    def __init__(self, cfg, make_discriminator):
        problems = [f"train.autoencoder.pixel must be l1 or l2, got {cfg.pixel!r}"] * (
            cfg.pixel not in ("l1", "l2")
        )
        for key in ("kl_weight", "disc_start", "disc_weight", "feature_weight"):
            if getattr(cfg, key) < 0:
                problems.append(f"train.autoencoder.{key} must be >= 0, got {getattr(cfg, key)}")
        if problems:  # build turns this into one ConfigError
            raise ConfigError("; ".join(problems))
        self.cfg, self.make_discriminator = cfg, make_discriminator
        self.latent_shape = None  # image shape (C, H, W) -> latent shape (c, h, w)
        self.discriminator: nn.Module | None = None
        self.judge: nn.Module | None = None  # features for cfg.feature_weight > 0
        self.optimizer = None

    def attach(self, model, device: torch.device, judge: nn.Module | None = None) -> None:
        """Take the run's autoencoder and device: build the discriminator (from the global torch
        RNG, seeded by the trainer) and its AdamW, and keep the judge (frozen). build.build_loss
        has made sure the network is an autoencoder (AutoencoderKL)."""
        self.latent_shape = model.net.latent_shape
        if judge is not None:
            self.judge = judge.to(device).eval().requires_grad_(False)
        if self.cfg.discriminator:
            d = self.make_discriminator(model.kind.shape[0]).to(device)
            self.discriminator = d.requires_grad_(False)  # only its own step gives it gradients
            self.optimizer = torch.optim.AdamW(
                d.parameters(), self.cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0
            )

    @property
    def wants_judge(self) -> bool:
        return self.cfg.feature_weight > 0

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor]:
        """(eps (B, c, h, w),) the reparameterisation noise of a global batch of images."""
        return (torch.randn((shape[0], *self.latent_shape(shape[1:])), generator=generator),)

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        """(per-example loss (B,), t (B,) = 0: an autoencoder has no noise level)."""
        (eps,) = noise
        x_hat, mean, logvar = model.net(x0, eps.to(x0.device))
        diff = x_hat - x0
        rec = (diff.abs() if self.cfg.pixel == "l1" else diff.square()).flatten(1).mean(1)
        loss = rec + self.cfg.kl_weight * kl_diagonal(mean, logvar) / x0[0].numel()
        if self.judge is not None:
            phi, phi_hat = self.judge.features(x0), self.judge.features(x_hat)
            loss = loss + self.cfg.feature_weight * (phi - phi_hat).square().mean(1)
        if self.disc_active(step):
            self._train_discriminator(x0, x_hat.detach())
            g = -self.discriminator(x_hat).flatten(1).mean(1)  # (B,); D's weights are frozen
            loss = loss + self._adaptive_weight(model.net, loss.mean(), g) * g
        return loss, torch.zeros(len(x0), device=x0.device)

    def _train_discriminator(self, x0: Tensor, x_hat: Tensor) -> None:
        """One AdamW step of D on this batch: real x0 against the detached reconstructions."""
        d = self.discriminator.requires_grad_(True)
        with torch.autocast(x0.device.type, enabled=False):
            d_loss = hinge_d_loss(d(x0.float()), d(x_hat.float()))
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        d.requires_grad_(False)

    def _adaptive_weight(self, net: nn.Module, rec: Tensor, g: Tensor) -> Tensor:
        """disc_weight |grad rec| / (|grad g| + 1e-4) at the last decoder layer, clamped to
        [0, 1e4] and detached (Esser et al. 2021, eq. 7); rec: the loss without its
        adversarial term."""
        last = getattr(net, "module", net).conv_out.weight  # through a DDP wrapper
        if not torch.is_grad_enabled():
            return torch.tensor(self.cfg.disc_weight, device=g.device)
        (rec_grad,) = torch.autograd.grad(rec, last, retain_graph=True)
        (g_grad,) = torch.autograd.grad(g.mean(), last, retain_graph=True)
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return (weight.clamp(0.0, 1e4) * self.cfg.disc_weight).detach()

    # the loss's own trainable state, checkpointed and restored by the trainer
    def state_dict(self) -> dict:
        if self.discriminator is None:
            return {}
        return {
            "discriminator": self.discriminator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer.load_state_dict(state["optimizer"])
