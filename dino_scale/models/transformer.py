"""DINO's deformable transformer: encoder, decoder with look-forward-twice box refinement,
and two-stage ("standard") mixed query selection.

Module and parameter names equal the official ones (``transformer.*`` keys of a checkpoint).
All tensors are batch-first: memory (B,S,C), queries (B,Q,C), boxes (B,Q,4) as (cx,cy,w,h).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from dino_scale.config_checks import ACTIVATION_NAMES
from dino_scale.ops import level_index_tensors

from .box_ops import inverse_sigmoid
from .deformable_attention import MSDeformAttn
# the level tables' functions are re-exported here (this module's public names before they moved)
from .level_tables import (gen_encoder_output_proposals, level_shape_list, proposals_from_tables, token_tables,
                           valid_counts_flat)
from .position_encoding import gen_sineembed_for_position
from .precision import class_head_fp32

__all__ = ["MLP", "DeformableTransformer", "gen_encoder_output_proposals", "proposals_from_tables",
           "select_topk_queries", "valid_counts_flat"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``layers.{i}`` keys)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


_ACTIVATIONS = {name: getattr(F, name) for name in ACTIVATION_NAMES}
ACTIVATIONS = ACTIVATION_NAMES  # the names model.activation takes


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention then FFN, each post-norm (norm1, norm2)."""

    def __init__(self, d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, backend=None):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            level_start_index, padding_mask)))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layers: List[DeformableEncoderLayer], checkpointing: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.checkpointing = checkpointing

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios: Tensor) -> Tensor:
        """Token centers in [0,1] of each level's valid area, times valid ratios:
        spatial_shapes (L,2) tensor or list of (H, W), valid_ratios (B,L,2) -> (B,S,L,2) as (x,y).
        One pass over all tokens with the cached per-size grid (:func:`token_tables`)."""
        centers, level, level_sizes, _ = token_tables(level_shape_list(spatial_shapes), valid_ratios.device)
        ref = centers / (valid_ratios[:, level] * level_sizes[level])  # (B,S,2): center / (ratio * size)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask,
                level_shapes: Optional[List[Tuple[int, int]]] = None):
        """src, pos (B,S,C); padding_mask (B,S) -> memory (B,S,C). ``level_shapes``: the
        (H, W) of ``spatial_shapes`` as Python ints, when the caller has them."""
        ref = self.reference_points(level_shapes if level_shapes is not None else spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(layer, out, pos, ref, spatial_shapes, level_start_index,
                                                        padding_mask, use_reentrant=False)
            else:
                out = layer(out, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return out


class DeformableDecoderLayer(nn.Module):
    """Self-attention (norm2), deformable cross-attention (norm1), FFN (norm3), each post-norm.
    Names follow the official layer, which is not in execution order."""

    def __init__(self, d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, backend=None):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None):
        """tgt, query_pos (B,Q,C); reference_points (B,Q,L,4); memory (B,S,C);
        self_attn_mask (Q,Q) bool True = blocked."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                                            need_weights=False)[0]))
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                             memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(ca))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Layers, final ``norm``, ``ref_point_head`` (MLP 2*d -> d -> d over the sine embedding of
    the reference box). ``bbox_embed``/``class_embed`` are set by the DINO module (shared
    heads: the same module objects as ``DINO.bbox_embed``/``DINO.class_embed``)."""

    def __init__(self, layers: List[DeformableDecoderLayer], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, memory, memory_padding_mask, refpoints_unsigmoid, spatial_shapes, level_start_index,
                valid_ratios, self_attn_mask=None) -> Tuple[List[Tensor], List[Tensor]]:
        """Returns ``hs`` [num_layers x (B,Q,C)] (after the final norm) and ``refs``
        [(num_layers + 1) x (B,Q,4)]: refs[0] the initial boxes, refs[l+1] layer l's refinement
        ``sigmoid(bbox_embed[l](raw output of layer l) + inverse_sigmoid(refs[l]))`` NOT detached
        (the next layer's input uses the detached copy): look forward twice."""
        output = tgt
        reference = refpoints_unsigmoid.sigmoid()
        refs = [reference]
        hs = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B,1,L,4)
        for lid, layer in enumerate(self.layers):
            box_head = self.bbox_embed[lid] if self.bbox_embed is not None else None
            output, new_reference, normed = self.step(layer, box_head, output, reference, ratios, memory,
                                                      spatial_shapes, level_start_index, memory_padding_mask,
                                                      self_attn_mask)
            if new_reference is not None:
                reference = new_reference.detach()
                refs.append(new_reference)
            hs.append(normed)
        return hs, refs

    def step(self, layer: DeformableDecoderLayer, box_head: Optional[nn.Module], output: Tensor, reference: Tensor,
             ratios: Tensor, memory: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             memory_padding_mask: Tensor, self_attn_mask: Optional[Tensor] = None
             ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """One decoder layer with its query positions and box refinement.

        output (B,Q,C), reference (B,Q,4) sigmoid boxes (detached), ratios (B,1,L,4) ->
        (the layer's raw output (B,Q,C), refined boxes ``sigmoid(box_head(output) +
        inverse_sigmoid(reference))`` (B,Q,4) undetached, or None without ``box_head``, the
        normalized output (B,Q,C)). ``dino_scale.models.compile.compile_regions`` compiles this
        as the decoder's region at layer granularity (one code for the six layers)."""
        ref_input = reference[:, :, None] * ratios  # (B,Q,L,4)
        sine = gen_sineembed_for_position(ref_input[:, :, 0, :], self.d_model // 2)
        sine = sine.to(self.ref_point_head.layers[0].weight.dtype)  # float32; a half-precision module's dtype
        output = layer(output, self.ref_point_head(sine), ref_input, memory, spatial_shapes, level_start_index,
                       memory_padding_mask, self_attn_mask)
        new_reference = None if box_head is None else (box_head(output) + inverse_sigmoid(reference)).sigmoid()
        return output, new_reference, self.norm(output)


def select_topk_queries(class_logits: Tensor, k: int) -> Tensor:
    """class_logits (B,S,C) -> indices (B,k) of the tokens with the largest max-class logit,
    in descending score order; equal scores are ordered by *descending* token index.

    ``torch.topk`` leaves the order of equal scores to the implementation (CPU and CUDA differ,
    so do torch versions), and ties are real here: invalid and padded tokens share one constant
    score (see ``gen_encoder_output_proposals``). The order matters because each selected
    position is paired with the learned content query of that slot. A stable sort over the
    index-reversed scores makes the rule explicit and device-independent; it reproduces the
    official outputs (CPU goldens), while plain ``topk`` on an H100 changed 9% of the boxes.
    """
    scores = class_logits.max(-1)[0].flip(1)  # reversed: the stable sort then favours high indices
    order = torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :k]
    return scores.shape[1] - 1 - order


class DeformableTransformer(nn.Module):
    """Encoder + two-stage query selection + decoder. Keys as the official ``transformer.*``."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.0, activation="relu", num_feature_levels=4, enc_n_points=4, dec_n_points=4,
                 num_queries=900, encoder_checkpointing=False, msda_backend=None):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        # (L, C), added to each level's position embedding, which only the encoder reads: made for
        # several levels and an encoder only, as the official (else never trained, a key its
        # checkpoints of such a config lack)
        self.register_parameter("level_embed", nn.Parameter(torch.empty(num_feature_levels, d_model))
                                if num_feature_levels > 1 and num_encoder_layers > 0 else None)
        self.encoder = DeformableEncoder(
            [DeformableEncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead,
                                    enc_n_points, msda_backend) for _ in range(num_encoder_layers)],
            checkpointing=encoder_checkpointing)
        self.decoder = DeformableDecoder(
            [DeformableDecoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead,
                                    dec_n_points, msda_backend) for _ in range(num_decoder_layers)], d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        # set by DINO (separate copies of the decoder heads)
        self.enc_out_bbox_embed: Optional[nn.Module] = None
        self.enc_out_class_embed: Optional[nn.Module] = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def flatten_levels(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor]
                       ) -> Tuple[Tensor, Tensor, Tensor]:
        """srcs/pos_embeds [(B,C,H_l,W_l)], masks [(B,H_l,W_l)] -> the levels flattened and
        concatenated token-wise: src (B,S,C), mask (B,S), pos (B,S,C) plus each level's
        ``level_embed`` (when there is one). Tensors only: compiled as one region by ``compile_regions``."""
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos = [p.flatten(2).transpose(1, 2) for p in pos_embeds]
        if self.level_embed is not None:
            pos = [p + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos)]
        return src_flat, mask_flat, torch.cat(pos, 1)

    def select_queries(self, memory: Tensor, mask_flat: Tensor, counts: Tensor, centers: Tensor, level: Tensor,
                       level_wh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Two-stage ("standard") selection of the ``num_queries`` best encoder tokens.

        memory (B,S,C), mask_flat (B,S), counts (B,L,2) and the size's token tables
        (:func:`token_tables`) -> (boxes (B,Q,4) in logit space, undetached: the encoder head's
        refinement of the selected proposals; the raw proposals (B,Q,4) sigmoid; the selected
        tokens' normalized memory (B,Q,C), undetached). Tensors only, so
        ``dino_scale.models.compile.compile_regions`` compiles it as one region."""
        out_memory, out_proposals = proposals_from_tables(memory, mask_flat, counts, centers, level, level_wh)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = class_head_fp32(self.enc_out_class_embed, out_memory)  # top-k over fp32 scores
        enc_coord = self.enc_out_bbox_embed(out_memory) + out_proposals  # logit space
        topk = select_topk_queries(enc_class, self.num_queries)
        boxes = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        proposals = torch.gather(out_proposals, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).sigmoid()
        tokens = torch.gather(out_memory, 1, topk.unsqueeze(-1).repeat(1, 1, self.d_model))
        return boxes, proposals, tokens

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_label: Optional[Tensor] = None, query_bbox: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None):
        """srcs/pos_embeds [(B,C,H_l,W_l)], masks [(B,H_l,W_l)]; optional denoising queries
        query_label (B,pad,C), query_bbox (B,pad,4) in logit space, attn_mask (pad+Q,pad+Q).

        Returns hs [L x (B,pad+Q,C)], refs [(L+1) x (B,pad+Q,4)], hs_enc (1,B,Q,C),
        ref_enc (1,B,Q,4) (sigmoid, undetached), init_box_proposal (B,Q,4) (sigmoid).
        """
        level_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]  # host ints: no device read-back
        src_flat, mask_flat, pos_flat = self.flatten_levels(srcs, masks, pos_embeds)
        spatial_shapes, level_start_index = level_index_tensors(level_shapes, src_flat.device)
        counts = valid_counts_flat(mask_flat, level_shapes)  # (B,L,2) un-padded (width, height) per level
        centers, level, level_sizes, level_wh = token_tables(level_shapes, src_flat.device)
        valid_ratios = counts.float() / level_sizes  # (B,L,2)

        memory = self.encoder(src_flat, pos_flat, spatial_shapes, level_start_index, valid_ratios, mask_flat,
                              level_shapes=level_shapes)

        # two-stage query selection
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"input too small: {memory.shape[1]} encoder tokens for {self.num_queries} queries "
                             f"(feature maps {level_shapes}); use larger images or fewer queries")
        refpoint_undetach, init_box_proposal, tgt_undetach = self.select_queries(memory, mask_flat, counts, centers,
                                                                                 level, level_wh)
        refpoint = refpoint_undetach.detach()
        bs = memory.shape[0]
        tgt = self.tgt_embed.weight[None].repeat(bs, 1, 1)
        if query_bbox is not None:
            refpoint = torch.cat([query_bbox, refpoint], dim=1)
            tgt = torch.cat([query_label, tgt], dim=1)

        hs, refs = self.decoder(tgt, memory, mask_flat, refpoint, spatial_shapes, level_start_index,
                                valid_ratios, attn_mask)
        hs_enc = tgt_undetach.unsqueeze(0)
        ref_enc = refpoint_undetach.sigmoid().unsqueeze(0)
        return hs, refs, hs_enc, ref_enc, init_box_proposal
