"""Writes this directory: an OLoRA adapter on a tiny GPT-2's c_proj, saved by PEFT 0.21.2 (which
factored the Conv1D kernel as stored), and the logits PEFT 0.21.2 computes with it.

`tests/test_peft_adapters.py::test_olora_gpt2_file_of_peft_before_022_keeps_its_function` reads
them: PEFT 0.22 factors W0^T instead, so that release can no longer give this reference.

Run once, with PEFT 0.21.2 first on the path (its wheel unpacked, no other change):
    pip download --no-deps peft==0.21.2 -d /tmp/w && unzip -q /tmp/w/peft-0.21.2-*.whl -d /tmp/p
    PYTHONPATH=/tmp/p .venv/bin/python tests/data/olora_gpt2_peft0212/make.py
"""

import pathlib

import numpy as np
import peft
import torch
import transformers

HERE = pathlib.Path(__file__).parent


def main() -> None:
    assert peft.__version__ == "0.21.2", peft.__version__
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # biases and LayerNorms off their trivial init, so they matter
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(HERE / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(HERE / "base"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj"], fan_in_fan_out=True,
                        init_lora_weights="olora"))
    with torch.no_grad():  # "trained": A and B off their start
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(HERE / "adapter")
    loaded = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(HERE / "base"), HERE / "adapter").eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=(3, 12))
    mask = (np.arange(12)[None, :] < np.array([12, 9, 5])[:, None]).astype(np.int64)
    with torch.no_grad():
        logits = loaded(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.savez(HERE / "reference.npz", input_ids=ids, attention_mask=mask,
             logits=logits.logits.numpy())


if __name__ == "__main__":
    main()
