"""Reusable propagation rules: the building blocks of layer handlers.

Each rule takes an :class:`~mudsc_graph.analysis.propagate.OpContext` and sets the node's output. The
built-in handlers in ``mudsc_plugins.layers`` are thin registrations of these rules, and plugin
authors can reuse them (``rules.elementwise`` for a custom activation, ``rules.reshape`` for a
custom view op, ...). Rules fall back to ``ctx.unsupported`` on anything they do not understand, so
the result is less merged, never wrong.
"""
from .base import param_value, rebase
from .contract import addmm, einsum, matmul, sdpa
from .layers import (
    channel_norm,
    conv_layer,
    embedding,
    f_batch_norm,
    f_conv,
    f_embedding,
    f_group_norm,
    f_layer_norm,
    f_linear,
    group_norm,
    layer_norm,
    linear_layer,
    multihead_attention,
    multihead_attention_features,
    nn_conv,
    nn_embedding,
    nn_group_norm,
    nn_layer_norm,
    nn_linear,
    prelu,
)
from .pointwise import (
    arg_reduce,
    constant_like,
    elementwise,
    no_tensor_output,
    pad,
    reduce,
    spatial,
    unary,
)
from .recurrent import aten_rnn, nn_rnn, rnn_features
from .shapes import (
    aten_index,
    aten_select,
    aten_slice,
    cat,
    expand,
    getitem,
    index_axes,
    movedim,
    permute,
    permute_axes,
    repeat,
    reshape,
    reshape_layouts,
    roll,
    split,
    stack,
    tensor_attribute,
    transpose,
    unbind,
)

__all__ = [
    "addmm", "aten_index", "aten_rnn", "aten_select", "aten_slice", "index_axes", "roll", "arg_reduce", "cat", "channel_norm", "constant_like", "conv_layer", "einsum", "elementwise", "embedding", "expand",
    "f_batch_norm", "f_conv", "f_embedding", "f_group_norm", "f_layer_norm", "f_linear", "getitem", "group_norm",
    "layer_norm", "linear_layer", "matmul", "movedim", "multihead_attention", "multihead_attention_features", "nn_conv", "nn_embedding",
    "nn_group_norm", "nn_layer_norm", "nn_linear", "nn_rnn", "no_tensor_output", "pad", "param_value", "permute",
    "permute_axes", "prelu", "rebase", "reduce", "repeat", "reshape", "reshape_layouts", "rnn_features", "sdpa", "spatial", "split",
    "stack", "tensor_attribute", "transpose", "unary", "unbind",
]
