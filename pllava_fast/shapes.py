"""Named model shapes for benchmarks and memory plans (random weights of a real architecture;
no torch import, so the CLI lists them and checks inputs against them before anything heavy
loads)."""

# the tiny random PLLaVA of ``testing.save_tiny_pllava`` (the demo's, the tests', ``make-tiny``)
TINY_DEFAULTS = dict(
    image_size=56, patch_size=14, vision_hidden=32, vision_layers=3, vision_heads=4,
    text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_model_type="llama",
    num_frames=4, pooling_shape=(4, 2, 2), vision_feature_layer=-2, projector_hidden_act="gelu",
    use_pooling=True, tie_word_embeddings=False, image_token_outside_vocab=False,
    vision_feature_select_strategy="default", seed=0,
)
TINY_MAX_POSITIONS = 4096

# PLLaVA-7B: CLIP ViT-L/14-336 + Vicuna-7B (llava-v1.6-vicuna-7b), pooling (16, 12, 12)
SHAPES = {
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu"),
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        num_frames=16, pooling_shape=(16, 12, 12), frame_shape=(24, 24)),
}
