"""LLaVA model: frozen vision tower -> trainable projector -> LLM (frozen in stage 1; tuned in
full or through LoRA adapters in stages 2 and 3, see tuning.py). The architecture only: how
it is built from local folders and saved is checkpoint_io.py's.

Shape legend (used in every comment below):
    B    batch size (samples)           N     image tokens per image
    T    text tokens incl. image slots  M     supervised tokens in the batch
    D_v  vision width                   D_lm  LLM width            V  vocabulary size

    image [B,3,H,W] -> VisionTower -> [B,N,D_v] -> Projector -> [B,N,D_lm] --+
    ids [B,T] (N slots per image) -> embed_tokens -> [B,T,D_lm] <- scatter -+-> LLM -> loss

In stage 1 only the projector has trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import VISION_TYPES, image_tokens, prefix_tokens
from prompts import CHAT_TEMPLATE_KWARGS, IGNORE_INDEX, IMAGE_TOKEN
from tuning import Tuning, assert_trainable

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- vision tower

class VisionTower(nn.Module):
    """A frozen transformers vision model that returns [B, N, D_v] token features.

    feature_layer: index into hidden_states (-1 last layer, -2 LLaVA-1.5's choice).
    select: "all" keeps every token (CLS/registers too), "patch" drops the prefix tokens.
    post_norm: apply the tower's final norm to every selected token.
    """

    def __init__(self, model: nn.Module, model_type: str, feature_layer: int = -1,
                 select: str = "all", post_norm: bool = False):
        super().__init__()
        if select not in ("all", "patch"):
            raise ValueError(f"feature select must be 'all' or 'patch', got {select!r}")
        self.model = model
        self.family, _, self.norm_attr = VISION_TYPES[model_type]
        self.feature_layer, self.select, self.post_norm = feature_layer, select, post_norm
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_prefix_tokens = prefix_tokens(cfg)               # CLS (+ DINOv3's registers)
        self.num_tokens = image_tokens(cfg, select)               # N
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionTower":
        # Frozen means eval, always: DINOv3 randomises RoPE and dropout would fire in train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        x = out.hidden_states[self.feature_layer]                   # [B, prefix + grid², D_v]
        if self.post_norm:
            x = getattr(self.model, self.norm_attr)(x)
        if self.select == "patch":
            x = x[:, self.num_prefix_tokens:]
        return x                                                     # [B, N, D_v]


# --------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """D_v -> D_lm. Named like transformers' LlavaMultiModalProjector (linear_1, act, linear_2)
    so that export is a rename, not a rewrite.

    linear: one Linear (the course: 768 -> 1024, 0.79M parameters).
    mlp2x_gelu: Linear -> GELU -> Linear (LLaVA-1.5).
    """

    TYPES = ("linear", "mlp2x_gelu")

    def __init__(self, kind: str, d_v: int, d_lm: int):
        super().__init__()
        if kind not in self.TYPES:
            raise ValueError(f"projector must be one of {self.TYPES}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(d_v, d_lm)
        self.act = nn.GELU() if kind == "mlp2x_gelu" else nn.Identity()
        self.linear_2 = nn.Linear(d_lm, d_lm) if kind == "mlp2x_gelu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # [B, N, D_v]
        return self.linear_2(self.act(self.linear_1(x)))             # [B, N, D_lm]


# --------------------------------------------------------------------------- the spec

@dataclass
class ModelSpec:
    """Everything needed to rebuild the model; stored as JSON in every checkpoint."""

    vision_tower: str                      # registry id or local path, as the user gave it
    llm: str                               # registry id or local path, as the user gave it
    projector: str = "linear"
    feature_layer: int = -1
    feature_select: str = "all"            # all | patch
    feature_post_norm: bool = False
    image_wrap: bool | None = None         # wrap slots in <|vision_start|> ... <|vision_end|>; None: auto
    image_token: str = IMAGE_TOKEN         # the token whose positions receive image features
    # Filled in by checkpoint_io.build_model from the loaded parts:
    vision_path: str = ""                  # where the frozen models were loaded from
    llm_path: str = ""
    vision_type: str = ""
    vision_hidden_size: int = 0
    llm_hidden_size: int = 0
    num_image_tokens: int = 0
    image_transform: dict = field(default_factory=dict)
    chat_template_kwargs: dict = field(default_factory=lambda: dict(CHAT_TEMPLATE_KWARGS))
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"checkpoint metadata has unknown fields {sorted(unknown)}; newer format?")
        return cls(**d)


# --------------------------------------------------------------------------- the loss, in chunks

class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over M tokens of cross_entropy(cap(hidden @ weight.T + bias), targets), computed
    `chunk` tokens at a time, with the gradients computed in the forward pass: the loss ends the
    graph, so backward only scales them. No chunk's [chunk, V] logits outlive it; the peak is one
    chunk's logits (and their gradient, in place) instead of [M, V] logits and their gradient.
    Liger's fused linear cross-entropy does this in a Triton kernel; this is plain torch, on any
    device. The matmuls run in the dtype autocast would give them, the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, cap: float | None) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None               # [M, D_lm]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None   # [V, D_lm]
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None    # [V]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, len(targets), chunk):
                h, y = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]     # [c, D_lm], [c]
                z = F.linear(h, w, b).float()                                                 # [c, V] logits
                if cap:                                       # Gemma-style soft-capping; Qwen has none
                    t = torch.tanh(z / cap)
                    z = t * cap
                lse = torch.logsumexp(z, dim=-1)                                              # [c]
                loss += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
                g = z.sub_(lse[:, None]).exp_()               # softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] -= 1                              # d loss / d logits
                if cap:
                    g.mul_(1 - t.square())                    # through cap * tanh(z / cap)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:start + chunk] = g @ w
                if grad_w is not None:
                    grad_w.add_(g.t() @ h)
                if grad_b is not None:
                    grad_b.add_(g.sum(0))
        ctx.grads = grad_h, grad_w, grad_b
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_h, grad_w, grad_b), (w_dtype, b_dtype) = ctx.grads, ctx.dtypes
        del ctx.grads                                         # held here only: no second copy of [V, D_lm]

        def scaled(g: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            return None if g is None else g.mul_(grad_loss).to(dtype or g.dtype)

        return scaled(grad_h), scaled(grad_w, w_dtype), scaled(grad_b, b_dtype), None, None, None


# --------------------------------------------------------------------------- combined model

class LlavaModel(nn.Module):
    def __init__(self, vision: VisionTower | None, projector: Projector, llm: nn.Module,
                 spec: ModelSpec, image_token_id: int):
        super().__init__()
        self.vision = vision            # None when training from cached features
        self.projector = projector
        self.llm = llm
        self.spec = spec
        self.image_token_id = image_token_id
        self.tuning = Tuning()          # what trains (tuning.py); stage 1: the projector only
        self.checkpointed_layers: list[nn.Module] = []
        self.sharded = False            # set by parallel.py under FSDP2: every rank generates in step
        self.ce_chunk_size = 0          # the loss over more supervised tokens than this goes in chunks (0: never)
        self.autocast_dtype: torch.dtype | None = None   # forward passes under autocast in this dtype (bf16), or not

    def train(self, mode: bool = True) -> "LlavaModel":
        super().train(mode)
        if self.tuning.llm == "none":
            self.llm.eval()             # frozen parts never leave eval mode (LoRA dropout needs train mode)
        if self.vision is not None:
            self.vision.eval()
        for layer in self.checkpointed_layers:
            # transformers checkpoints a decoder layer only when that layer's own `training`
            # flag is set; its children (attention, MLP, dropout) stay in eval mode.
            layer.training = mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each LLM layer in backward instead of storing its activations: ~30% more
        compute for a fraction of the activation memory (large LLMs, long sequences)."""
        enable = getattr(self.llm, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointed_layers = [m for m in self.llm.modules() if getattr(m, "gradient_checkpointing", False)]
        if not self.checkpointed_layers:
            raise RuntimeError(f"{type(self.llm).__name__} has no checkpointable layers")
        self.train(self.training)

    def autocast(self) -> torch.autocast:
        """The autocast of this model's forward passes (training, held-out loss, answers): bf16
        matmuls over fp32 master weights when autocast_dtype is bf16 (CUDA; --precision bf16)."""
        device = next(self.projector.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def assert_only_projector_trainable(self) -> None:
        assert_trainable(self, Tuning())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vision is None:
            raise RuntimeError("this model was built without a vision tower; pass image_features")
        return self.vision(pixel_values)                             # [B, N, D_v]

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with projected image features written into the image slots.

        image_features holds the batch's images in order ([B_img, N, D_v], B_img <= B: text-only
        samples have none); None for a batch without any image. The projector runs even then
        (on no rows), so every process computes the same graph."""
        slots = input_ids == self.image_token_id                     # [B, T]
        weight = next(self.projector.parameters())
        if image_features is None:
            image_features = weight.new_zeros(0, self.spec.num_image_tokens, self.spec.vision_hidden_size)
        feats = self.projector(image_features.to(weight.dtype))      # [B_img, N, D_lm]
        n_slots, n_feats = int(slots.sum()), feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            # transformers' LLaVA raises here too: a silent mismatch trains garbage.
            raise ValueError(f"image slots ({n_slots}) != image features ({feats.shape[0]} images x "
                             f"{feats.shape[1]} tokens = {n_feats}); prompt and tower disagree")
        # The slot id may lie outside the embedding table (a token we added); look up 0 instead.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))  # [B, T, D_lm]
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def _features(self, pixel_values, image_features):
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        return image_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sum of token losses, number of supervised tokens).

        The caller divides by the supervised-token count of the whole global batch, so that
        gradient accumulation and several processes give the mean over all tokens.
        Logits exist only at supervised positions: [M, V], never [B, T, V].
        Packed batches (dataset.collate_packed) pass position_ids that restart at 0 for each
        sample and no attention mask; transformers then keeps attention within each sample.
        """
        embeds = self.embed(input_ids, self._features(pixel_values, image_features))
        if position_ids is not None:
            attention_mask = None
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False).last_hidden_state  # [B, T, D_lm]
        targets = labels[:, 1:]                                      # position t predicts token t+1
        keep = targets != IGNORE_INDEX                               # [B, T-1]
        return self.loss(hidden[:, :-1][keep], targets[keep]), keep.sum()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the cross-entropy of the M supervised tokens: hidden [M, D_lm], targets [M].
        Over `ce_chunk_size` tokens, in chunks that never hold [M, V] logits (stage 2's long
        answers: 4096 x 151,936 fp32 logits are 2.3 GiB, and their gradient as much again)."""
        head = self.llm.get_output_embeddings()
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if self.ce_chunk_size and len(targets) > self.ce_chunk_size and type(head) is nn.Linear:
            return ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, self.ce_chunk_size, cap)
        return F.cross_entropy(self.logits(hidden).float(), targets, reduction="sum")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-style models; Qwen has none
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_ids: list[int],
                 pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 streamer: Any = None, stop: Any = None) -> list[list[int]]:
        """Reply token ids per sample, stop tokens removed. Greedy when temperature == 0.

        input_ids are LEFT-padded for batches; transformers' generate derives positions
        from the attention mask and uses the KV cache. `stop` (a threading.Event) ends the
        generation at the next token once set (a browser that left).
        """
        # FSDP2 (parallel.py): the root's parameters (embeddings, head, projector) gathered for the
        # whole reply, and each decoder layer all-gathered at every step, so every rank runs every
        # decoding step until all are done (transformers' synced_gpus, as under ZeRO-3).
        if self.sharded:
            self.unshard()
        try:
            return self._generate(input_ids, attention_mask, stop_ids, pixel_values, image_features, max_new_tokens,
                                  temperature, top_p, streamer, stop)
        finally:
            if self.sharded:
                self.reshard()

    def _generate(self, input_ids, attention_mask, stop_ids, pixel_values, image_features, max_new_tokens,
                  temperature, top_p, streamer, stop) -> list[list[int]]:
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return torch.full((ids.shape[0],), stop.is_set(), dtype=torch.bool, device=ids.device)

        embeds = self.embed(input_ids, self._features(pixel_values, image_features))
        sample = temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=list(stop_ids), pad_token_id=stop_ids[0])
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=gen_cfg,
                                streamer=streamer, synced_gpus=self.sharded,
                                stopping_criteria=StoppingCriteriaList([_Stop()]) if stop is not None else None)  # [B, new]
        replies = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            replies.append(row[:cut])
        return replies

    def summary(self) -> dict[str, Any]:
        def count(m):
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        parts = {"vision": count(self.vision), "projector": count(self.projector), "llm": count(self.llm)}
        return {
            "params": parts,
            "trainable": sum(p.numel() for _, p in self.trainable_parameters()),
            "frozen": sum(parts.values()) - sum(p.numel() for _, p in self.trainable_parameters()),
            "image_tokens": self.spec.num_image_tokens,
            "widths": f"D_v={self.spec.vision_hidden_size} -> D_lm={self.spec.llm_hidden_size}",
            "bf16_weights_gib": round(sum(parts.values()) * 2 / 2**30, 3),
        }
