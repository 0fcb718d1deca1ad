"""How often a bfloat16 Gemma 4 router ties at the K-th place, and what that does to patch_gemma4's outputs.

A tiny random model (Transformers' Gemma 4, default initialisation) runs unpatched; each router is then
fed the hidden states it saw, unpatched and patched; finally the whole model runs patched. Prints the
share of K-th-place ties, how many routings differ (and whether any differs without a tie), and how far
the model's logits move. Not a test (pytest does not collect it): the measurement behind the README's
"bfloat16 and ties". Usage: ``E=128 K=8 PYTHONPATH=. python tests/ties_in_bfloat16.py`` (needs transformers).
"""

from __future__ import annotations

import os

import torch
from transformers.models.gemma4 import modeling_gemma4

from g4route.adapters.transformers import patch_gemma4


def main() -> None:
    experts, topk = int(os.environ.get("E", 128)), int(os.environ.get("K", 8))
    config = modeling_gemma4.Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, enable_moe_block=True, num_experts=experts,
        top_k_experts=topk, moe_intermediate_size=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = modeling_gemma4.Gemma4ForCausalLM(config).eval().to(torch.bfloat16)
    input_ids = torch.randint(0, 256, (8, 256), generator=torch.Generator().manual_seed(1))
    seen = []
    hooks = [layer.router.register_forward_hook(lambda module, args, output: seen.append((module, args[0])))
             for layer in model.model.layers]
    with torch.no_grad():
        reference = model(input_ids, use_cache=False).logits.float()
    for hook in hooks:
        hook.remove()
    calls = tied = differ = differ_untied = 0
    with torch.no_grad():
        for router, hidden in seen:
            p0, _, i0 = router(hidden)
            with patch_gemma4(router):
                _, _, i1 = router(hidden)
            top = p0.sort(-1, descending=True).values
            tie = top[:, topk - 1] == top[:, topk]
            different = (i0.sort(-1).values != i1.sort(-1).values).any(-1)
            equally_good = torch.equal(p0.gather(-1, i0).sort(-1).values[different],
                                       p0.gather(-1, i1.long()).sort(-1).values[different])
            calls += hidden.shape[0]
            tied += int(tie.sum())
            differ += int(different.sum())
            differ_untied += int((different & ~tie).sum())
            print(f"router: {hidden.shape[0]} tokens, {int(tie.sum())} K-th-place ties, {int(different.sum())} "
                  f"different choices, all equally good: {equally_good}")
        with patch_gemma4(model):
            patched = model(input_ids, use_cache=False).logits.float()
    relative = ((patched - reference).abs().amax(-1) / reference.abs().amax(-1)).flatten()
    print(f"E={experts} K={topk}: {calls} router calls, K-th-place ties {tied} ({tied / calls:.1%}), different "
          f"choices {differ} ({differ / calls:.1%}), of which without a tie {differ_untied}")
    print(f"model logits: tokens moved by more than 1% of their largest logit {int((relative > 1e-2).sum())} of "
          f"{relative.numel()}, largest {float(relative.max()):.3g}, median {float(relative.median()):.3g}")


if __name__ == "__main__":
    main()
