"""Keras's own MultiHeadAttention tests, run against LinearMultiHeadAttention.

The test class of `keras/src/layers/attention/multi_head_attention_test.py`
(the installed Keras) is subclassed; while its tests run, the name
`layers.MultiHeadAttention` in that module means our layer. Tests that
depend on softmax values, on `sliding_window` / flash attention, or on
Keras internals our layer does not use are listed in `SKIPPED` with the
reason; every other test runs unchanged.
"""

import types

import pytest

keras_mha_test = pytest.importorskip("keras.src.layers.attention.multi_head_attention_test")

import keras_linear_attention as kla  # noqa: E402

SOFTMAX = "compares against softmax attention's values"
SLIDING = "`sliding_window` is a softmax option; LinearMultiHeadAttention refuses it"
AXES = (
    "attends over a subset of the positional axes (attention_axes), which "
    "LinearMultiHeadAttention refuses (documented)"
)
INTERNAL = (
    "exercises Keras's softmax `_compute_attention`, which LinearMultiHeadAttention "
    "inherits but never calls"
)
SKIPPED = {
    "test_basics_with_flash_attention": "flash attention (JAX/torch only)",
    "test_flash_attention_with_errors": "flash attention",
    "test_correctness_disable_flash_attention": SOFTMAX,
    "test_correctness_enable_flash_attention": SOFTMAX + "; flash attention",
    "test_sliding_window": SLIDING,
    "test_sliding_window_serialization": SLIDING,
    "test_high_dim_attention_4d_inputs_1freebatch_mask2": AXES,
    "test_high_dim_attention_4d_inputs_1freebatch_mask3": AXES,
    "test_high_dim_attention_4d_inputs_1freebatch_mask4": AXES,
    "test_high_dim_attention_5d_inputs_2d_attention": AXES,
    "test_high_dim_attention_5d_inputs_2d_attention_fullmask": AXES,
    "test_attention_axes_negative_indexing": AXES,
    "test_causal_only_masks_non_4d_inputs": AXES,
    "test_causal_only_skipped_for_subclass": INTERNAL,
    "test_compute_attention_combines_causal_and_explicit_mask_fused_fallback": INTERNAL,
    "test_compute_attention_combines_causal_and_explicit_mask_manual_path": INTERNAL,
}


def _layers_with_ours():
    """Keras's `layers` module, but `MultiHeadAttention` is ours."""
    namespace = types.SimpleNamespace(**vars(keras_mha_test.layers))
    namespace.MultiHeadAttention = kla.LinearMultiHeadAttention
    return namespace


class TestKerasMultiHeadAttentionSuite(keras_mha_test.MultiHeadAttentionTest):
    def setUp(self):
        name = self._testMethodName
        if name in SKIPPED:
            self.skipTest(SKIPPED[name])
        self._keras_layers = keras_mha_test.layers
        keras_mha_test.layers = _layers_with_ours()
        super().setUp()

    def tearDown(self):
        keras_mha_test.layers = self._keras_layers
        super().tearDown()


def test_every_skip_names_a_keras_test():
    """A skip list entry that no longer matches a test is stale."""
    names = set(dir(TestKerasMultiHeadAttentionSuite))
    assert set(SKIPPED) <= names, set(SKIPPED) - names
