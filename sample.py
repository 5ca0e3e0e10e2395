"""
Generate text from a checkpoint, one token at a time through the model's recurrent step:
New-LLM and the stack carry their fixed-size context, the Transformer its growing KV cache.

    python sample.py --ckpt runs/newllm/ckpt.pt --prompt "ROMEO:" --tokens 200
    python sample.py --ckpt runs/transformer/ckpt.pt --prompt "ROMEO:" --temperature 0.8 --top-k 20
"""

import math

import torch
import torch.nn.functional as F

from run_folder import load_checkpoint
from cli import Parser, UserError, check_seed, pick_device, run_script
from data import tokenizer_from_state
from models import model_from_checkpoint


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None):
    """Continue each row of `prompt` (B, T0) by max_new_tokens tokens, one step at a time.

    The prompt is read through model.step too, so generation never re-reads the past:
    the state is all the model keeps. A model with a learned position table
    (model.max_len) cannot step past it; there the state is rebuilt by re-reading the
    last half-table of tokens, and generation goes on.
    """
    model.eval()
    if prompt.size(1) == 0:
        raise UserError("the prompt is empty: give at least one token")
    if model.max_len is not None and prompt.size(1) > model.max_len:
        raise UserError(f"the prompt is {prompt.size(1)} tokens; this model reads at most {model.max_len}")
    logits, state = read(model, prompt)
    out = [prompt]
    position = prompt.size(1)
    for _ in range(max_new_tokens):
        logits = logits.float() / max(temperature, 1e-6)
        if top_k is not None:  # only the k most likely tokens may be drawn
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_token = torch.multinomial(F.softmax(logits, dim=-1), 1)  # (B, 1)
        out.append(next_token)
        if model.max_len is not None and position == model.max_len:  # out of positions: re-read the recent half
            logits, state = read(model, torch.cat(out, dim=1)[:, -(model.max_len // 2):])
            position = model.max_len // 2
        else:
            logits, state = model.step(next_token[:, 0], state)
            position += 1
    return torch.cat(out, dim=1)


def read(model, tokens):
    """A fresh state that has read `tokens` (B, T), and the logits after the last one."""
    state = model.init_state(tokens.size(0), tokens.device)
    for t in range(tokens.size(1)):
        logits, state = model.step(tokens[:, t], state)
    return logits, state


def main(argv=None):
    parser = Parser(prog="sample.py", description="Generate text from a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt or last.pt written by train.py")
    parser.add_argument("--prompt", default="", help="text to continue (default: a newline / <BOS>)")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="below 1 is more conservative, above 1 wilder")
    parser.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    parser.add_argument("--seed", type=int, default=1337, help="random seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    if args.tokens < 0 or not args.temperature > 0 or math.isinf(args.temperature) or args.num_samples < 1 \
            or (args.top_k is not None and args.top_k < 1):
        raise UserError("--tokens must be >= 0, --temperature a positive number, --num-samples and --top-k >= 1")
    check_seed(args.seed)

    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(checkpoint).to(device)
    tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    ids = tokenizer.encode(args.prompt) or tokenizer.start_ids()  # no prompt: a line break or <BOS>
    torch.manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k)
    for i, row in enumerate(out.tolist()):
        if i:
            print("-" * 40)
        print(tokenizer.decode(row))


if __name__ == "__main__":
    run_script(main)
