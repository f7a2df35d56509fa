"""Built-in layer handlers, registered through the same ``mudsc_layer_handlers`` hook as any plugin.

Each record maps fx targets (module classes, functions, method names) to a rule from
:mod:`mudsc_graph.analysis.rules`. To support a new op, a plugin returns its own records; to change a
built-in, it returns a record for the same target with a higher ``priority``.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from mudsc_graph.analysis import rules
from mudsc_graph.plugin.hookspecs import hookimpl
from mudsc_graph.plugin.records import LayerHandler

M, FN, METH = "call_module", "call_function", "call_method"

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink, nn.LogSigmoid,
    nn.Softmax, nn.LogSoftmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
_UNARY_FUNCS = (
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.erf, torch.sin, torch.cos, torch.square, operator.neg, operator.pos, F.softmax,
    torch.softmax, F.log_softmax, torch.log_softmax, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp,
    torch.clip, F.normalize, torch.nan_to_num,
)
_UNARY_METHODS = (
    "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "softmax", "log_softmax", "clamp",
    "clip", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "cpu", "cuda",
    "requires_grad_", "square", "erf", "sin", "cos", "relu_", "sigmoid_", "tanh_", "gelu", "type_as",
)
_BINARY_FUNCS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, operator.mod, torch.add, torch.sub, torch.mul, torch.div,
    torch.pow, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.masked_fill,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch.eq, torch.gt, torch.lt,
)
_BINARY_METHODS = (
    "add", "sub", "mul", "div", "pow", "add_", "sub_", "mul_", "div_", "masked_fill", "masked_fill_",
    "maximum", "minimum", "where", "lerp", "eq", "ne", "gt", "lt", "ge", "le",
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.LPPool1d, nn.LPPool2d,
)
_POOL_FUNCS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)
_REDUCE_FUNCS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.norm, torch.var, torch.std, torch.prod)
_REDUCE_METHODS = ("mean", "sum", "amax", "amin", "logsumexp", "norm", "var", "std", "prod")
_RESHAPE_FUNCS = (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten, torch.ravel)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "ravel", "view_as", "reshape_as")


# ATen twins of the torch-level targets above, for graphs from the torch.export tracer. A packet
# (aten.add) covers every overload; the rules read arguments by name through the schema.
aten = torch.ops.aten
_ATEN_UNARY = (
    aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.mish, aten.elu, aten.selu,
    aten.celu, aten.leaky_relu, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardtanh, aten.hardtanh_,
    aten.softplus, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.exp, aten.log, aten.sqrt, aten.rsqrt,
    aten.abs, aten.neg, aten.erf, aten.sin, aten.cos, aten.square, aten.softmax, aten._softmax, aten._safe_softmax,
    aten.log_softmax, aten._log_softmax, aten.dropout, aten.dropout_, aten.feature_dropout, aten.alpha_dropout,
    aten.clamp, aten.clamp_min, aten.clamp_max, aten.clip, aten.nan_to_num, aten.to, aten._to_copy, aten.clone,
    aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy,
)
_ATEN_BINARY = (
    aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.rsub, aten.maximum, aten.minimum, aten.lerp, aten.addcmul,
    aten.masked_fill, aten.masked_fill_, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__, aten.__or__,
    aten.bitwise_and, aten.bitwise_or, aten.logical_and, aten.logical_or, aten.add_, aten.sub_, aten.mul_, aten.div_,
    aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar,
)
_ATEN_POOLS = (
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
    aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
    aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
    aten.adaptive_max_pool3d, aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
    aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
    aten._upsample_bilinear2d_aa,
)
_ATEN_PADS = (aten.pad, aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
              aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d)
_ATEN_REDUCE = (aten.mean, aten.sum, aten.amax, aten.amin, aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.var,
                aten.std, aten.prod, aten.var_mean, aten.std_mean)
_ATEN_RESHAPE = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze,
                 aten.view_as, aten.reshape_as)
_ATEN_CONSTANT = (aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.new_zeros, aten.new_ones,
                  aten.new_empty, aten.new_full, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor)
_ATEN_METADATA = (aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset, aten._assert_tensor_metadata,
                  aten._assert_scalar, aten._assert_async, aten.sym_constrain_range_for_size, aten._local_scalar_dense,
                  aten.item)


def _interpolate(ctx) -> None:
    rules.spatial(ctx, k=ctx.input(0).ndim - 2)


def _handlers() -> list[LayerHandler]:
    H = LayerHandler
    return [
        # layers with weights
        H("torch.nn.Linear", M, (nn.Linear,), rules.nn_linear, description="output units = weight rows"),
        H("torch.nn.ConvNd", M, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), rules.nn_conv, description="channels; groups give block structure"),
        H("torch.nn.BatchNorm", M, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), rules.channel_norm),
        H("torch.nn.LayerNorm", M, (nn.LayerNorm, nn.RMSNorm), rules.nn_layer_norm),
        H("torch.nn.GroupNorm", M, (nn.GroupNorm,), rules.nn_group_norm, description="channel space in num_groups blocks"),
        H("torch.nn.Embedding", M, (nn.Embedding,), rules.nn_embedding),
        H("torch.nn.PReLU", M, (nn.PReLU,), rules.prelu),
        H("torch.nn.MultiheadAttention", M, (nn.MultiheadAttention,), rules.multihead_attention,
          description="packed q/k/v, head blocks", features=rules.multihead_attention_features),
        H("torch.nn.recurrent", M, (nn.LSTM, nn.GRU), rules.nn_rnn,
          description="hidden units per layer and direction; gate blocks sum(h, h, h[, h])", features=rules.rnn_features),
        H("aten.recurrent", FN, (aten.lstm.input, aten.gru.input), rules.aten_rnn,
          description="nn.LSTM / nn.GRU in torch.export graphs", features=rules.rnn_features),
        H("torch.nn.functional.linear", FN, (F.linear, aten.linear), rules.f_linear),
        H("torch.nn.functional.conv", FN, (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                           aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
                                           aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d), rules.f_conv),
        H("torch.nn.functional.batch_norm", FN, (F.batch_norm, F.instance_norm, aten.batch_norm, aten.native_batch_norm,
                                                 aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
                                                 aten.instance_norm), rules.f_batch_norm),
        H("torch.nn.functional.layer_norm", FN, (F.layer_norm, F.rms_norm, aten.layer_norm, aten.native_layer_norm, aten.rms_norm), rules.f_layer_norm),
        H("torch.nn.functional.group_norm", FN, (F.group_norm, aten.group_norm), rules.f_group_norm),
        H("torch.nn.functional.embedding", FN, (F.embedding, aten.embedding), rules.f_embedding),
        H("torch.nn.functional.scaled_dot_product_attention", FN, (F.scaled_dot_product_attention, aten.scaled_dot_product_attention), rules.sdpa),
        # per-element ops
        H("activations", M, _ACTIVATIONS, rules.unary),
        H("unary-functions", FN, _UNARY_FUNCS + _ATEN_UNARY, rules.unary),
        H("unary-methods", METH, _UNARY_METHODS, rules.unary),
        H("binary-functions", FN, _BINARY_FUNCS + _ATEN_BINARY, rules.elementwise),
        H("binary-methods", METH, _BINARY_METHODS, rules.elementwise),
        H("aten-pointwise", FN, (torch.Tag.pointwise,), rules.elementwise,
          description="any other ATen operator tagged pointwise: elementwise with broadcasting"),
        # spatial
        H("pooling", M, _POOLS, rules.spatial),
        H("pooling-functions", FN, _POOL_FUNCS + _ATEN_POOLS, rules.spatial),
        H("interpolate", FN, (F.interpolate,), _interpolate),
        H("pad", FN, (F.pad,) + _ATEN_PADS, rules.pad),
        # shapes
        H("torch.nn.Flatten", M, (nn.Flatten, nn.Unflatten), rules.reshape),
        H("reshape-functions", FN, _RESHAPE_FUNCS + _ATEN_RESHAPE, rules.reshape),
        H("reshape-methods", METH, _RESHAPE_METHODS, rules.reshape),
        H("permute", FN, (torch.permute, aten.permute), rules.permute),
        H("permute-method", METH, ("permute",), rules.permute),
        H("transpose", FN, (torch.transpose, torch.swapaxes, torch.t, aten.transpose, aten.swapaxes, aten.t), rules.transpose),
        H("transpose-methods", METH, ("transpose", "swapaxes", "t"), rules.transpose),
        H("movedim", FN, (torch.movedim, torch.moveaxis, aten.movedim), rules.movedim),
        H("movedim-method", METH, ("movedim", "moveaxis"), rules.movedim),
        H("expand", METH, ("expand", "expand_as", "broadcast_to"), rules.expand),
        H("expand-function", FN, (torch.broadcast_to, aten.expand, aten.expand_as), rules.expand),
        H("repeat", METH, ("repeat",), rules.repeat),
        H("repeat-function", FN, (aten.repeat,), rules.repeat),
        H("cat", FN, (torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat, aten.concatenate), rules.cat),
        H("stack", FN, (torch.stack, aten.stack), rules.stack),
        H("split", FN, (torch.split, torch.chunk, torch.tensor_split, aten.split, aten.split_with_sizes, aten.unsafe_split,
                        aten.chunk, aten.tensor_split), rules.split),
        H("split-methods", METH, ("split", "chunk", "tensor_split", "split_with_sizes"), rules.split),
        H("unbind", FN, (torch.unbind, aten.unbind), rules.unbind),
        H("unbind-method", METH, ("unbind",), rules.unbind),
        H("getitem", FN, (operator.getitem,), rules.getitem),
        H("slice", FN, (torch.narrow, aten.slice, aten.narrow), rules.aten_slice, description="x[:, a:b] as an ATen op"),
        H("narrow-method", METH, ("narrow",), rules.aten_slice),
        H("index", FN, (aten.index,), rules.aten_index, description="x[tensor] as an ATen op"),
        H("select", FN, (torch.select, aten.select), rules.aten_select, description="x[:, j] as an ATen op"),
        H("roll", FN, (torch.roll, aten.roll), rules.roll, description="rolled axes keep their order; others pass"),
        H("roll-method", METH, ("roll",), rules.roll),
        # reductions and contractions
        H("reductions", FN, _REDUCE_FUNCS + _ATEN_REDUCE, rules.reduce),
        H("reduction-methods", METH, _REDUCE_METHODS, rules.reduce),
        H("arg-reductions", FN, (torch.max, torch.min, torch.argmax, torch.argmin, aten.max, aten.min, aten.argmax, aten.argmin), rules.arg_reduce),
        H("arg-reduction-methods", METH, ("max", "min", "argmax", "argmin"), rules.arg_reduce),
        H("einsum", FN, (torch.einsum, aten.einsum), rules.einsum),
        H("matmul", FN, (torch.matmul, operator.matmul, torch.bmm, torch.mm, aten.matmul, aten.bmm, aten.mm), rules.matmul),
        H("matmul-methods", METH, ("matmul", "bmm", "mm"), rules.matmul),
        H("addmm", FN, (torch.addmm, aten.addmm), rules.addmm),
        H("constant-like", FN, (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like) + _ATEN_CONSTANT, rules.constant_like),
        H("constant-like-methods", METH, ("new_zeros", "new_ones", "new_empty", "new_full"), rules.constant_like),
        # metadata
        H("getattr", FN, (builtins.getattr,), rules.tensor_attribute),
        H("metadata", FN, (builtins.len,) + _ATEN_METADATA, rules.no_tensor_output),
        H("metadata-methods", METH, ("size", "dim", "numel", "item", "tolist"), rules.no_tensor_output),
    ]


@hookimpl
def mudsc_layer_handlers() -> list[LayerHandler]:
    return _handlers()
