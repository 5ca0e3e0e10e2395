"""
The configurations people rerun, by name: `python train.py --preset NAME` (any flag given
beside a preset overrides it). bench.py and experiments.py build their models from here too.

    seed-baseline, seed-exp1..3, seed-transformer   the report's five architectures and settings (REPORT.md)
    best-newllm-cpu / best-matrix-cpu / transformer-cpu / lstm-cpu / mamba-cpu   ~0.83M parameters, matched: a laptop CPU
    best-newllm / best-matrix / transformer-gpu           ~10.8M parameters (nanoGPT's Shakespeare size): a GPU

"best-newllm" is New-LLM in its best form, the vector stack (stack.py); "best-matrix" the
same stack with context matrices. The report's own model is `--arch newllm`.
"""

# The report's setup: word level, 1,000 tokens, one line per sequence of at most 32 tokens,
# batch 16, Adam (no weight decay) at a constant 1e-4, clipping 1.0, dropout 0.1.
SEED_SETUP = dict(tokenizer="word", vocab_size=1000, sentences=True, block_size=32, dropout=0.1,
                  batch_size=16, lr=1e-4, beta2=0.999, weight_decay=0.0, warmup_iters=0,
                  lr_schedule="constant", grad_clip=1.0, epochs=50, eval_interval=0, eval_iters=50)
SEED_NEWLLM = dict(SEED_SETUP, arch="newllm", embed_dim=256, context_dim=256, hidden_dim=512, layers=8)

# The best attention-free stacks: gated memories after a short convolution, no position table.
# The vector one is the best of the report's own fixes (results/improvements.md); the matrix one
# adds the delta rule's look-up (results/recall.md), 2 heads per block at the CPU size. The
# improvements study also spends the matrix's parameters on 8 smaller heads: a little better at
# text; the recall study's smaller heads recall less.
BEST_VECTOR = dict(arch="stack", mixer="vector", gate=True, short_conv=4, context_norm=True, pos_embed=False)
BEST_MATRIX = dict(BEST_VECTOR, mixer="matrix")

CPU_RUN = dict(block_size=128, batch_size=32, dropout=0.1, max_iters=1500, lr=2e-3)
GPU_RUN = dict(block_size=256, batch_size=64, dropout=0.2, max_iters=5000, lr=1e-3)

PRESETS = {
    "seed-baseline": SEED_NEWLLM,
    "seed-exp1": dict(SEED_NEWLLM, context_dim=512),
    "seed-exp2": dict(SEED_NEWLLM, context_dim=512, hidden_dim=1024, layers=10),
    "seed-exp3": dict(SEED_NEWLLM, context_dim=512, hidden_dim=1024, layers=10, epochs=150),
    "seed-transformer": dict(SEED_SETUP, arch="transformer", embed_dim=256, heads=4, layers=6,
                             hidden_dim=1024, post_norm=True),
    # CPU size: hidden widths chosen so every model has the Transformer's parameter count (within 0.2%)
    "best-newllm-cpu": dict(BEST_VECTOR, **CPU_RUN, embed_dim=128, context_dim=128, hidden_dim=524, layers=4),
    "best-matrix-cpu": dict(BEST_MATRIX, **CPU_RUN, embed_dim=128, context_dim=128, context_heads=2,
                            hidden_dim=458, layers=4),
    "transformer-cpu": dict(CPU_RUN, arch="transformer", embed_dim=128, heads=4, layers=4),
    "lstm-cpu": dict(CPU_RUN, arch="lstm", embed_dim=128, hidden_dim=238, layers=2),  # char-rnn's 2 layers
    "mamba-cpu": dict(BEST_VECTOR, **CPU_RUN, mixer="mamba", embed_dim=128, context_dim=128, state_dim=16,
                      hidden_dim=500, layers=4),
    # GPU size
    "best-newllm": dict(BEST_VECTOR, **GPU_RUN, embed_dim=384, context_dim=384, hidden_dim=1554, layers=6),
    "best-matrix": dict(BEST_MATRIX, **GPU_RUN, embed_dim=384, context_dim=384, context_heads=6,
                        hidden_dim=1356, layers=6),
    "transformer-gpu": dict(GPU_RUN, arch="transformer", embed_dim=384, heads=6, layers=6),
}

RUN_SETTINGS = ("tokenizer", "vocab_size", "sentences", "block_size", "batch_size", "lr", "beta2", "weight_decay",
                "warmup_iters", "lr_schedule", "grad_clip", "epochs", "eval_interval", "eval_iters", "max_iters")


def model_settings(name, **overrides):
    """A preset's architecture and model fields only (no training settings): for bench.py."""
    return {k: v for k, v in dict(PRESETS[name], **overrides).items() if k not in RUN_SETTINGS}
