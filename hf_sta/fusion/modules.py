"""The trainable part of a fused model: the Adaptive Knowledge Fusion (AKF) module and the simple-fusion baseline.

Both map ``{source: SourceOutput}`` to ``{task: logits}``; each task ``t`` has one source (its own trained model),
with head features ``f_t`` of width ``d_t`` and, when the source has one, its own head ``W_t, b_t``.

**AKF** (:class:`AdaptiveKnowledgeFusion`). Component ``k`` of source ``s`` (pooled, ``(batch, d_s)``) becomes a token

    x_{s,k} = W_{s,k} LN(c_{s,k}) + b_{s,k} + e_s + e_k                          (batch, D)

(``LN`` without affine parameters: sources' hidden states have very different scales), and each task gets a learned
query token ``q_t``. A pre-norm Transformer runs over the ``T + sum_s K_s`` tokens in two stages:

* ``intra_layers`` layers where a token only sees its own source's tokens and task ``t``'s query only sees source
  ``t``'s tokens (intra-task knowledge: how the components of one model combine);
* ``inter_layers`` layers of full attention (inter-task knowledge: every query reads every source).

The query's output ``o_t`` (``(batch, D)``) is added to the task's own features through a zero-initialised
up-projection and read by the task's head:

    logits_t = head_t(f_t + U_t o_t),   U_t = 0 at initialisation, head_t = the source's head (copied)

so before training the fused model predicts exactly what each source predicts, and training only adds what the
other sources and the earlier components know.

**Simple fusion** (:class:`ConcatFusion`): ``logits_t = head_t([f_1; ...; f_S])``, ``head_t`` initialised to
``[0, ..., W_t, ..., 0], b_t`` (the same starting point), trained the same way.

What the paper says and what is inferred here. Only the abstract of Zhou, Bao, Wang, Zhong and Zhang, *Efficient
Multi-Task Modeling through Automated Fusion of Trained Models* (arXiv:2504.09812, 2025) and third-party summaries
of it were reachable (no method text, equations or code in this project's search corpora): trained single-task
models of different structures are decomposed hierarchically into operable components; a Transformer-based AKF
module integrates intra-task knowledge (a mixture-of-experts style gate over one task's components) and inter-task
knowledge (self-attention across tasks); AKF modules are stacked, one per component level; the experiments are on
tabular recommendation data (Census-Income, Ali-CCP, AliExpress), and the models are assumed to share their layer
structure. Inferred and chosen here, for text models that share nothing: each component gets its own projection (any
width, any depth); the stacked per-level modules become two stages of Transformer layers over all component tokens
(source-local attention, then full attention), with learned task queries in place of per-task gates; the fused
signal is a zero-initialised residual on each task's own head input, so training starts from the sources'
predictions (not from scratch) and the checkpoint chosen on validation can never be worse there than the sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .sources import SourceOutput

__all__ = ["AdaptiveKnowledgeFusion", "ConcatFusion", "FUSIONS"]


def _heads(
    tasks: Sequence[str], in_widths: Mapping[str, int], num_labels: Mapping[str, int], init: Mapping[str, nn.Linear]
) -> nn.ModuleDict:
    heads = nn.ModuleDict()
    for task in tasks:
        head = nn.Linear(in_widths[task], num_labels[task])
        if task in init:
            head.load_state_dict(init[task].state_dict(), strict=False)
            if init[task].bias is None:
                nn.init.zeros_(head.bias)
        heads[task] = head
    return heads


class AdaptiveKnowledgeFusion(nn.Module):
    """Component tokens + task queries -> two-stage Transformer -> zero-initialised residual into each task's head.

    Args:
        tasks: task names; task ``t``'s source is ``sources[t]``.
        component_widths: ``{source: [d_k, ...]}``.
        feature_widths: ``{task: d_t}``, the width of the source's head features.
        num_labels: ``{task: n_t}``.
        source_heads: ``{task: nn.Linear}`` to initialise each head from (a new head otherwise).
        fusion_dim: ``D``, the common width of the tokens.
        intra_layers / inter_layers: Transformer layers with source-local / full attention.
        num_heads: attention heads (``D`` must be divisible by it).
        dropout: in the Transformer and on ``o_t``.
        ffn_multiplier: feed-forward width ``= ffn_multiplier * D``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        component_widths: Mapping[str, Sequence[int]],
        feature_widths: Mapping[str, int],
        num_labels: Mapping[str, int],
        source_heads: Mapping[str, nn.Linear],
        *,
        fusion_dim: int = 128,
        intra_layers: int = 1,
        inter_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.1,
        ffn_multiplier: int = 2,
    ) -> None:
        super().__init__()
        self.tasks, self.sources = list(tasks), list(component_widths)
        self.projections = nn.ModuleDict(
            {s: nn.ModuleList(nn.Linear(w, fusion_dim) for w in widths) for s, widths in component_widths.items()}
        )
        levels = max(len(widths) for widths in component_widths.values())
        self.source_embedding = nn.Parameter(torch.randn(len(self.sources), fusion_dim) * 0.02)
        self.level_embedding = nn.Parameter(torch.randn(levels, fusion_dim) * 0.02)
        self.task_queries = nn.Parameter(torch.randn(len(self.tasks), fusion_dim) * 0.02)

        def encoder(layers: int) -> nn.TransformerEncoder | None:
            if layers == 0:
                return None
            layer = nn.TransformerEncoderLayer(
                fusion_dim, num_heads, ffn_multiplier * fusion_dim, dropout, batch_first=True, norm_first=True
            )
            return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        self.intra, self.inter = encoder(intra_layers), encoder(inter_layers)
        self.norm = nn.LayerNorm(fusion_dim)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.ModuleDict({t: nn.Linear(fusion_dim, feature_widths[t]) for t in self.tasks})
        for up in self.up.values():
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.heads = _heads(self.tasks, feature_widths, num_labels, source_heads)
        owners = [self.sources.index(t) if t in self.sources else -1 for t in self.tasks]
        owners += [i for i, s in enumerate(self.sources) for _ in component_widths[s]]
        owner = torch.tensor(owners)
        # True = may not attend. A token sees its own source's tokens; query t sees itself and source t's tokens.
        blocked = owner[:, None] != owner[None, :]
        blocked[torch.arange(len(self.tasks)), torch.arange(len(self.tasks))] = False
        self.register_buffer("intra_mask", blocked, persistent=False)

    def tokens(self, outputs: Mapping[str, SourceOutput]) -> torch.Tensor:
        """``(batch, T + sum_s K_s, D)``: the task queries, then every source's component tokens."""
        rows = []
        for index, source in enumerate(self.sources):
            for level, (projection, component) in enumerate(zip(self.projections[source], outputs[source].components)):
                normed = nn.functional.layer_norm(component.float(), component.shape[-1:])
                rows.append(projection(normed) + self.source_embedding[index] + self.level_embedding[level])
        batch = rows[0].shape[0]
        queries = self.task_queries.unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([queries, torch.stack(rows, dim=1)], dim=1)

    def forward(self, outputs: Mapping[str, SourceOutput], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden = self.tokens(outputs)
        if self.intra is not None:
            hidden = self.intra(hidden, mask=self.intra_mask)
        if self.inter is not None:
            hidden = self.inter(hidden)
        hidden = self.dropout(self.norm(hidden))
        logits = {}
        for task in tasks:
            query = hidden[:, self.tasks.index(task)]
            features = outputs[task].features.float()
            logits[task] = self.heads[task](features + self.up[task](query))
        return logits


class ConcatFusion(nn.Module):
    """Simple fusion: ``logits_t = head_t(dropout([f_1; ...; f_S]))``, ``head_t`` starting as the source's head."""

    def __init__(
        self,
        tasks: Sequence[str],
        component_widths: Mapping[str, Sequence[int]],
        feature_widths: Mapping[str, int],
        num_labels: Mapping[str, int],
        source_heads: Mapping[str, nn.Linear],
        *,
        dropout: float = 0.1,
        **_: object,
    ) -> None:
        super().__init__()
        self.tasks, self.sources = list(tasks), list(component_widths)
        total = sum(feature_widths[s] for s in self.sources)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict()
        for task in self.tasks:
            head = nn.Linear(total, num_labels[task])
            if task in source_heads:
                with torch.no_grad():
                    head.weight.zero_()
                    head.bias.zero_()
                    start = sum(feature_widths[s] for s in self.sources[: self.sources.index(task)])
                    own = source_heads[task]
                    head.weight[:, start : start + own.in_features] = own.weight
                    if own.bias is not None:
                        head.bias.copy_(own.bias)
            self.heads[task] = head

    def forward(self, outputs: Mapping[str, SourceOutput], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        features = self.dropout(torch.cat([outputs[s].features.float() for s in self.sources], dim=-1))
        return {task: self.heads[task](features) for task in tasks}


FUSIONS: dict[str, type[nn.Module]] = {"akf": AdaptiveKnowledgeFusion, "concat": ConcatFusion}
