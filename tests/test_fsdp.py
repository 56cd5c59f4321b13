"""FSDP: the GPT-2 XL (1.5B) and Llama-2-7B LoRA configs shard their frozen weights over 8
devices.

The measurement runs in a child process with 8 CPU devices (XLA's device count is fixed when jax
starts). GPT-2 XL is never materialised: its frozen tree is a tree of shapes (`jax.eval_shape`),
and the bytes each device would hold come from the shardings alone; a smaller model placed for
real checks that this count is what devices actually hold.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, xla_flags

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, transformers
from lora_jax.interop import hub
from lora_jax import methods
from lora_jax.training import sharding
from lora_jax.config import load_config
from lora_jax.models import family

def frozen_tree(config, abstract):
    fields = dict(config.model.random_init)
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = hub.model_from_hf_config(hf, task=None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    stack = methods.build(config.method, family(config.model.random_init.model_type))
    def init_and_split(key):
        params = model.init(key, jnp.ones((1, 8), jnp.int32))["params"]
        return stack.split(params, key)
    if abstract:
        return jax.eval_shape(init_and_split, jax.random.key(0))
    return jax.jit(init_and_split)(jax.random.key(0))

config = load_config(sys.argv[1])
mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
frozen, trainable = frozen_tree(config, abstract=True)
held = sharding.bytes_per_device(frozen, sharding.frozen_shardings(frozen, mesh))
total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(frozen))

# The same frozen tree with the block kernels at nf4 (config.model.quantize='nf4'), in shapes.
from flax import traverse_util
from lora_jax.quant import kernels as quant
fam = family(config.model.random_init.model_type)
flat = traverse_util.flatten_dict(frozen)
nf4_tree = traverse_util.unflatten_dict({
    p: quant.abstract(v, "nf4") if p[-1] == "kernel" and fam.layer_index("/".join(p[:-1])) is not None
    else v for p, v in flat.items()})
nf4_held = sharding.bytes_per_device(nf4_tree, sharding.frozen_shardings(nf4_tree, mesh))
nf4_total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nf4_tree))

# A smaller GPT-2 placed for real: what the devices hold equals the count from the shardings.
config.model.random_init.update(json.loads(sys.argv[2]))
small, _ = frozen_tree(config, abstract=False)
shardings = sharding.frozen_shardings(small, mesh)
placed = sharding.place(jax.device_get(small), shardings)
actual = {}
for leaf in jax.tree_util.tree_leaves(placed):
    for shard in leaf.addressable_shards:
        actual[shard.device] = actual.get(shard.device, 0) + shard.data.nbytes
counted = sharding.bytes_per_device(small, shardings)

print(json.dumps({
    "mesh": dict(mesh.shape), "devices": len(held), "total": int(total),
    "per_device": sorted(int(b) for b in held.values()),
    "nf4_total": int(nf4_total), "nf4_per_device": sorted(int(b) for b in nf4_held.values()),
    "frozen_params": int(sum(x.size for x in jax.tree_util.tree_leaves(frozen))),
    "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))),
    "small_actual": sorted((str(d), int(b)) for d, b in actual.items()),
    "small_counted": sorted((str(d), int(b)) for d, b in counted.items()),
    "small_total": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(small))),
}))
"""


@pytest.fixture(scope="module")
def xl_on_eight_devices():
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    return _on_eight_devices("configs/e2e.py:model=gpt2-xl", dict(n_layer=2, n_embd=256, n_head=4))


@pytest.fixture(scope="module")
def llama_7b_on_eight_devices():
    return _on_eight_devices("configs/instruct.py:model=llama2-7b", dict(
        num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1024))


def _on_eight_devices(config: str, small: dict) -> dict:
    """The child's measurement of `config` (a small model of the same kind: `small` fields)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO_ROOT / config), json.dumps(small)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpt2_xl_config_is_the_1_5b_model_with_fsdp_over_every_device(xl_on_eight_devices):
    r = xl_on_eight_devices
    assert r["mesh"] == {"data": 1, "fsdp": 8} and r["devices"] == 8
    assert 1.55e9 < r["frozen_params"] < 1.57e9  # GPT-2 XL: 1,557,611,200 parameters
    assert r["total"] == 2 * r["frozen_params"]  # frozen weights held in bf16
    # LoRA r=4 on q and v of 48 layers: 48 * 2 * 4 * (1600 + 1600) = 1,228,800 adapter scalars.
    assert r["trainable_params"] == 48 * 2 * 4 * (1600 + 1600)


def test_fsdp_cuts_the_frozen_bytes_per_device_about_8x(xl_on_eight_devices):
    r = xl_on_eight_devices
    smallest, largest = r["per_device"][0], r["per_device"][-1]
    assert largest - smallest < 0.001 * largest  # every device holds about the same share
    # Only small leaves (layer norms, biases) stay replicated: 8x less up to a fraction of a %.
    assert 7.9 < r["total"] / largest <= 8.0
    assert largest < 400 * 2**20  # about 370 MiB of the 2.9 GiB


def test_llama2_7b_lora_config_shards_its_bf16_weights_8x(llama_7b_on_eight_devices):
    """configs/instruct.py:model=llama2-7b, shapes only: the 6.74B frozen weights in bf16 (12.55
    GiB) over fsdp=8 are about 1.57 GiB per device; LoRA r=8 on q, k, v, o trains 8.4M."""
    r = llama_7b_on_eight_devices
    assert r["mesh"] == {"data": 1, "fsdp": 8} and r["devices"] == 8
    assert r["frozen_params"] == 6_738_415_616  # Llama-2-7B
    assert r["total"] == 2 * r["frozen_params"]
    assert r["trainable_params"] == 32 * 4 * 8 * (4096 + 4096)  # 8,388,608
    smallest, largest = r["per_device"][0], r["per_device"][-1]
    assert largest - smallest < 0.001 * largest
    assert 7.99 < r["total"] / largest <= 8.0  # only the RMSNorm scales stay replicated
    assert r["small_actual"] == r["small_counted"]


def test_llama2_7b_frozen_weights_at_nf4_on_one_device_and_on_eight(llama_7b_on_eight_devices):
    """The README's nf4 column: the block kernels at nf4 (4 bits plus a float32 absmax per 64),
    embeddings, norms and the LM head in bf16. 6.48B of the 6.74B parameters are block kernels:
    at 0.5625 bytes each that is 3.39 GiB, plus 0.49 GiB of bf16 (embedding, head, norms):
    3.88 GiB on one device, against 12.55 GiB in bf16; over 8 devices about 0.49 GiB each."""
    r = llama_7b_on_eight_devices
    gib = 2**30
    kernels = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    bf16_rest = 2 * (r["frozen_params"] - kernels)
    assert r["nf4_total"] == kernels // 2 + 4 * kernels // 64 + bf16_rest
    assert 3.85 * gib < r["nf4_total"] < 3.9 * gib
    assert r["nf4_total"] < 0.31 * r["total"]
    largest = r["nf4_per_device"][-1]
    assert 7.99 < r["nf4_total"] / largest <= 8.0 and largest < 0.5 * gib


def test_the_count_from_shardings_is_what_devices_hold(xl_on_eight_devices):
    r = xl_on_eight_devices
    assert r["small_actual"] == r["small_counted"]
    per_device = [b for _, b in r["small_actual"]]
    assert len(per_device) == 8 and r["small_total"] / max(per_device) > 5


def test_mesh_sizes_that_cannot_work_are_named():
    from lora_jax.training import sharding

    with pytest.raises(ValueError, match="both be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="data=3 does not divide"):
        sharding.make_mesh(data=3, fsdp=-1)
    assert dict(sharding.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 1}


def test_placing_an_array_already_placed_keeps_it_without_a_copy():
    import jax
    import numpy as np

    from lora_jax.training import sharding

    mesh = sharding.make_mesh()
    host = np.arange(6.0).reshape(2, 3)
    placed = sharding.place({"w": host}, sharding.replicated(mesh))["w"]
    assert isinstance(placed, jax.Array)
    np.testing.assert_array_equal(placed, host)
    again = sharding.place({"w": placed}, sharding.replicated(mesh))["w"]
    assert again is placed  # no second buffer for a model's worth of frozen weights
    single = jax.device_put(host, jax.devices()[0])  # equivalent, but not the mesh's sharding:
    moved = sharding.place({"w": single}, sharding.replicated(mesh))["w"]
    assert moved.sharding == sharding.replicated(mesh)  # the step's outputs will match its inputs
