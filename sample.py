"""
Generate text from a checkpoint, for either architecture, one token at a time
through the model's recurrent step: New-LLM carries its context vector, the
Transformer its KV cache.

    python sample.py --ckpt runs/newllm/ckpt.pt --prompt "ROMEO:" --tokens 200
    python sample.py --ckpt runs/transformer/ckpt.pt --prompt "ROMEO:" --temperature 0.8 --top-k 20
"""

import torch

from data import tokenizer_from_state
from lab import Parser, UserError, generate, load_checkpoint, model_from_checkpoint, pick_device, run_script


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
    if args.tokens < 0 or args.temperature <= 0 or (args.top_k is not None and args.top_k < 1):
        raise UserError("--tokens must be >= 0, --temperature > 0 and --top-k >= 1")

    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.ckpt, map_location=device)
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
