"""The module online RL trains: the policy and, for PPO with GAE, its critic, as one ``nn.Module``.

One module means one optimizer (the critic's learning rate is a parameter group), one checkpoint, one DDP
wrapper, and one forward that returns both the policy's logits and the critic's values at the response
positions, so a PPO update is a single backward of ``policy loss + vf_coef * value loss``.

The critic is either separate (its own backbone with a scalar head, ``models.scalar_head.ScalarHeadModel``,
initialised from a reward model or the policy's weights) or shared: a linear value head reading the policy's own
final hidden states, so with LoRA the critic trains the same adapter the policy does.

Positions: ``batch["targets"]`` holds, at position t, the token that follows t (or -100), so the logits at the
trained positions predict the sampled response tokens, and the hidden state at the same positions is the state
in which that token was chosen: its value is V(s_t). Values are therefore read at exactly the logits' positions.

Built here too: a separate critic (:func:`load_critic`) and the frozen reference the policy's KL is measured against
(:func:`frozen_reference`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.config import ModelConfig, PeftConfig
from posttrain.losses import IGNORE_INDEX
from posttrain.models.adapters import is_peft_model
from posttrain.models.forward import token_logits
from posttrain.models.loading import load_model, model_dir_of


def _causal_lm(policy: Any) -> Any:
    return policy.get_base_model() if is_peft_model(policy) else policy


class ActorCritic(nn.Module):
    """``forward(batch) -> (logits (N, V), values (N,) or None)`` at the N response positions (row-major)."""

    def __init__(self, policy: Any, critic: Any = None, shared_value_head: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head: nn.Linear | None = None
        if shared_value_head:
            hidden = _causal_lm(policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # A zero head starts every value at 0, so the first updates do not push noise into a shared backbone.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or self.value_head is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        with_values: bool = True,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_mask`` is a padding mask, or the 4D mask of shared-prefix rows with their ``position_ids``."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        keep = targets != IGNORE_INDEX
        if self.value_head is not None and with_values:
            # One pass serves both heads, through the model's own forward: its logits carry what the architecture
            # does after lm_head (Gemma 2's soft-capping, Cohere's logit_scale, Granite's logits_scaling), exactly
            # as the rollout's and reference's log-probs did; the value head reads the final (normed) hidden state.
            logits, hidden = token_logits(self.policy, batch, with_hidden=True)
            return logits, self.value_head(hidden).squeeze(-1).float()
        logits = token_logits(self.policy, batch)
        values = None
        if self.critic is not None and with_values:
            values = self.critic(input_ids, attention_mask=attention_mask, position_ids=position_ids)[keep]
        return logits, values

    @torch.no_grad()
    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The critic's values at the response positions, without the policy's logits where the critic is separate."""
        keep = targets != IGNORE_INDEX
        if self.critic is not None:
            return self.critic(input_ids, attention_mask=attention_mask, position_ids=position_ids)[keep]
        return self(input_ids, attention_mask, targets, position_ids=position_ids)[1]  # type: ignore[return-value]

    def parameter_groups(
        self, critic_lr: float | None = None, critic_max_grad_norm: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer groups named ``policy`` and (with a critic) ``critic``: the runtime clips each to its own max
        norm and logs ``grad_norm/policy`` and ``grad_norm/critic``; the critic's may set its own learning rate and
        max norm (None: the optimizer's)."""
        critic_names = ("critic.", "value_head.")
        policy_params = [p for name, p in self.named_parameters() if not name.startswith(critic_names)]
        critic_params = [p for name, p in self.named_parameters() if name.startswith(critic_names)]
        groups: list[dict[str, Any]] = [{"params": policy_params, "name": "policy"}]
        if critic_params:
            options = {"lr": critic_lr, "max_grad_norm": critic_max_grad_norm}
            groups.append(
                {"params": critic_params, "name": "critic", **{k: v for k, v in options.items() if v is not None}}
            )
        return groups

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """The policy into ``directory`` (a Hugging Face model, what later stages load); a separate critic into
        ``directory/../critic`` and a shared value head into ``directory/../value_head.safetensors``."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(directory, **kwargs)
        if self.critic is not None:
            self.critic.save_pretrained(Path(directory).parent / "critic", **kwargs)
        if self.value_head is not None:
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                str(Path(directory).parent / "value_head.safetensors"),
            )


def load_critic(path: str | None, model: ModelConfig, peft: PeftConfig, tokenizer: Any) -> Any:
    """A separate critic with a value head: ``path`` (``critic.path``; a reward-model run directory resolves to its
    model/ folder, whose head is then loaded, not fresh), or else a copy of the policy's ``model`` with a fresh head,
    with the policy's ``peft`` method."""
    critic_path = str(model_dir_of(path)) if path else model.path
    loaded, _ = load_model(model.model_copy(update={"path": critic_path}), peft, tokenizer, scalar_head=True)
    return loaded


def frozen_reference(policy: Any, kl_coef: float, device: torch.device) -> Any:
    """A frozen copy of a fully fine-tuned ``policy`` to measure the KL against; None for adapters (the reference is
    the same model with the adapter switched off, ``models.forward.reference_model``) and without a KL anchor:
    kl_coef 0 needs no reference (kl_target, the only way it could grow, is refused with it), so the rollout skips
    its pass (TRL's GRPO does the same, beta 0)."""
    if kl_coef and not is_peft_model(policy):
        return copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    return None
