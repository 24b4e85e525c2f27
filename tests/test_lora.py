"""LoRA tests on the tiny models (CPU, fp32): merged vs unmerged, saved vs loaded, adapters off vs the base model,
which parameters train, optimizer groups, and PEFT reading our adapters (and us reading PEFT's) when peft is installed."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import lora  # noqa: E402

MODELS = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]
# LM attention + MLP, the vision blocks' qkv (and Qwen2.5-VL's vision MLP, which reuses the LM's names), the merger
EVERYWHERE = r".*(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|attn\.qkv|merger\..*)"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine spinning threads cost 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    """(name, checkpoint path, one encoded demo example with an image)."""
    path = data.resolve_model(request.param)
    sample = data.load_dataset([data.demo_path("sft", "val")], "sft")[0]
    return request.param, path, data.Encoder(path)(sample)


def load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def forward(model, ex):
    return model(input_ids=ex["input_ids"][None], position_ids=ex["position_ids"][:, None],
                 pixel_values=ex["pixel_values"], image_grid_thw=ex["image_grid_thw"]).logits


def logits(model, ex):
    with torch.no_grad():
        return forward(model, ex)


def randomize_lora(model, seed=0):
    """B starts at zero, which would make every comparison trivially pass."""
    generator = torch.Generator().manual_seed(seed)
    for _, m in lora.lora_layers(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=generator) * 0.1


def lora_names(model):
    return {n for n, _ in lora.lora_layers(model)}


def test_merge_matches_unmerged(tiny, tmp_path):
    name, path, ex = tiny
    model = lora.add_lora(load(path), rank=4, alpha=8, dropout=0.1, target_modules=EVERYWHERE)
    randomize_lora(model)
    assert any(lora.model_part(n) == "vit" for n in lora_names(model))
    assert any(lora.model_part(n) == "aligner" for n in lora_names(model))
    expected = logits(model, ex)
    lora.save_adapter(model, tmp_path / "adapter")
    args = ["merge", "--model", name, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
    if name == MODELS[0]:  # the real command line once; in-process for the other model, which saves a start-up
        subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), *args], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        assert lora.main(args) == 0
    merged = load(tmp_path / "merged")
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(load(path).state_dict())
    assert (logits(merged, ex) - expected).abs().max() < 1e-4
    in_memory = lora.merge_lora(model)
    assert not lora.lora_layers(in_memory) and (logits(in_memory, ex) - expected).abs().max() < 1e-4

    config, base_config = (json.load(open(os.path.join(p, "config.json"))) for p in (tmp_path / "merged", path))
    assert config["dtype"] == base_config["dtype"]
    assert data.Encoder(str(tmp_path / "merged"))(data.load_dataset([data.demo_path("sft", "val")], "sft")[0])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(path).chat_template
    for file in ("chat_template.jinja", "preprocessor_config.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.exists(tmp_path / "merged" / file), file


def test_save_load_round_trip(tiny, tmp_path):
    _, path, ex = tiny
    model = lora.add_lora(load(path), rank=4, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True)
    randomize_lora(model)
    lora.save_adapter(model, tmp_path)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16 and config["use_rslora"]
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_dropout"] == 0.05
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 2 * len(lora_names(model))
    assert all(k.startswith("base_model.model.model.language_model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in saved)

    # what a training script passes under FSDP2: a gathered state dict, here with activation-checkpoint wrapper names
    gathered = {k.replace(".mlp.", ".mlp._checkpoint_wrapped_module."): v.clone() for k, v in model.state_dict().items()}
    lora.save_adapter(model, tmp_path / "gathered", state_dict=gathered)
    assert open(tmp_path / "gathered" / "adapter_model.safetensors", "rb").read() == \
        open(tmp_path / "adapter_model.safetensors", "rb").read()

    # a resumed run reads the weights under the names of the model with LoRA added
    assert lora.read_adapter_weights(tmp_path).keys() == {k for k in model.state_dict() if ".lora_" in k}

    loaded = lora.load_adapter(load(path), tmp_path)
    assert lora_names(loaded) == lora_names(model)
    assert torch.equal(logits(loaded, ex), logits(model, ex))
    # an adapter trained with transformers < 4.52, where the LM was `model.layers` (and the vision tower `visual`)
    os.makedirs(tmp_path / "legacy")
    legacy = {k.replace(".language_model.", "."): v for k, v in saved.items()}
    save_file(legacy, tmp_path / "legacy" / "adapter_model.safetensors")
    (tmp_path / "legacy" / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(logits(lora.load_adapter(load(path), tmp_path / "legacy"), ex), logits(model, ex))
    # a model that already has (differently initialised) LoRA layers is overwritten in place
    again = lora.add_lora(load(path), 4, 16, 0.0, ["q_proj", "v_proj"], use_rslora=True)
    assert torch.equal(logits(lora.load_adapter(again, tmp_path), ex), logits(model, ex))
    with pytest.raises(ValueError, match="missing key"):  # more layers than the file has
        lora.load_adapter(lora.add_lora(load(path), 4, 16, 0.0, ["q_proj", "v_proj", "o_proj"], use_rslora=True), tmp_path)
    with pytest.raises(ValueError, match="r=8"):
        lora.load_adapter(lora.add_lora(load(path), 8, 16, 0.0, ["q_proj", "v_proj"], use_rslora=True), tmp_path)


def test_disable_adapters_is_the_base_model(tiny):
    _, path, ex = tiny
    base_logits = logits(load(path), ex)
    model = lora.add_lora(load(path), 4, 8, 0.0, EVERYWHERE)
    assert torch.equal(logits(model, ex), base_logits)  # B = 0 at init: the wrapped model starts as the base
    randomize_lora(model)
    with lora.disable_adapters(model):
        assert torch.equal(logits(model, ex), base_logits)
    assert not torch.allclose(logits(model, ex), base_logits)


def test_targets(tiny):
    _, path, _ = tiny
    model = load(path)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lm = {n for n in linears if ".language_model." in n}
    assert lora_names(lora.add_lora(load(path), 2, 4)) == lm and "lm_head" not in lm
    assert lora_names(lora.add_lora(load(path), 2, 4, target_modules=["all-linear"])) == lm
    names = lora_names(lora.add_lora(load(path), 2, 4, target_modules=["q_proj", "down_proj"]))
    # Qwen2.5-VL's vision MLP also has down_proj: a names list stays in the language model
    assert names == {n for n in lm if n.endswith((".q_proj", ".down_proj"))}
    regex = r"model\.visual\.(blocks\.\d+\.attn\.qkv|(merger|deepstack_merger_list)\..*)"
    expected = {n for n in linears if n.endswith(".attn.qkv") or lora.model_part(n) == "aligner"}
    assert lora_names(lora.add_lora(load(path), 2, 4, target_modules=regex)) == expected
    assert lora_names(lora.add_lora(load(path), 2, 4, target_modules=[regex])) == expected  # as a command line gives it
    assert {lora.model_part(n) for n in expected} == {"vit", "aligner"}
    with pytest.raises(ValueError, match="q_proj"):  # the message lists candidate names
        lora.add_lora(load(path), 2, 4, target_modules=["query_key_value"])
    with pytest.raises(ValueError, match="matched no"):
        lora.add_lora(load(path), 2, 4, target_modules=r"model\.nothing\..*")
    wrapped = lora.add_lora(model, 2, 4)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(wrapped, 2, 4)


TRAINABLE_CASES = [  # (train_type, freeze_vit, freeze_llm, freeze_aligner)
    ("full", True, False, False), ("full", False, True, False), ("full", False, False, True), ("full", True, False, True),
    ("lora", True, False, False), ("lora", False, True, False), ("lora", False, False, True)]


@pytest.mark.parametrize("case", TRAINABLE_CASES, ids=[c[0] + "".join(f"-freeze_{part}" for part, flag in zip(("vit", "llm", "aligner"), c[1:]) if flag)
                              for c in TRAINABLE_CASES])
def test_set_trainable(tiny, case):
    train_type, freeze_vit, freeze_llm, freeze_aligner = case
    _, path, ex = tiny
    model = load(path)
    if train_type == "lora":
        randomize_lora(lora.add_lora(model, 2, 4, target_modules=EVERYWHERE))
    trainable, total = lora.set_trainable(model, train_type, freeze_vit, freeze_llm, freeze_aligner)
    frozen = {p for p, flag in (("vit", freeze_vit), ("llm", freeze_llm), ("aligner", freeze_aligner)) if flag}
    want = {n for n, _ in model.named_parameters() if lora.model_part(n) not in frozen and
            (train_type == "full" or ".lora_" in n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in want)
    assert total == sum(p.numel() for p in model.parameters())
    assert {lora.model_part(n) for n in want} == {"vit", "llm", "aligner"} - frozen  # every unfrozen part trains

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    forward(model, ex).float().pow(2).mean().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in want:
            assert p.grad is not None and not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} changed though frozen"


def test_param_groups(tiny):
    _, path, _ = tiny
    model = lora.add_lora(load(path), 2, 4, target_modules=EVERYWHERE)
    lora.set_trainable(model, "lora", freeze_vit=False, freeze_llm=False, freeze_aligner=False)
    groups = lora.param_groups(model, lr=1e-4, weight_decay=0.1, lorap_lr_ratio=16, vit_lr=1e-5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = name_of[id(p)]
            part_lr = 1e-5 if lora.model_part(n) == "vit" else 1e-4
            assert g["lr"] == pytest.approx(part_lr * (16 if ".lora_B." in n else 1)), (g["name"], n)
    assert {g["name"] for g in groups} == {"default", "default.lora_B", "vit", "vit.lora_B"}
    assert torch.optim.AdamW(groups).param_groups[0]["name"] == groups[0]["name"]  # torch keeps the extra key

    model = load(path)
    lora.set_trainable(model, "full", freeze_vit=False, freeze_llm=True, freeze_aligner=False)
    groups = lora.param_groups(model, lr=1e-4, weight_decay=0.1, vit_lr=1e-5, aligner_lr=2e-5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    grouped = [(g, name_of[id(p)], p) for g in groups for p in g["params"]]
    assert sorted(n for _, n, _ in grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for g, n, p in grouped:
        assert g["lr"] == {"vit": 1e-5, "aligner": 2e-5}[lora.model_part(n)]
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.1), n
    assert {g["name"] for g in groups} == {"vit", "vit.no_decay", "aligner", "aligner.no_decay"}


def test_peft_compatibility(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    _, path, ex = tiny
    # default targets: on Qwen2.5-VL the saved target_modules must keep PEFT off the vision MLP's same-named layers
    for i, targets in enumerate([None, EVERYWHERE]):
        model = lora.add_lora(load(path), 4, 8, 0.0, targets, use_rslora=bool(i))
        randomize_lora(model, seed=i)
        lora.save_adapter(model, tmp_path / f"ours{i}")
        theirs = peft.PeftModel.from_pretrained(load(path), tmp_path / f"ours{i}").eval()
        wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert wrapped == lora_names(model)
        assert (logits(theirs, ex) - logits(model, ex)).abs().max() < 1e-5

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"], use_rslora=True)
    theirs = peft.get_peft_model(load(path), config).eval()
    generator = torch.Generator().manual_seed(1)
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=generator) * 0.1
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lora.load_adapter(load(path), tmp_path / "theirs")
    assert any(lora.model_part(n) == "vit" for n in lora_names(ours))  # PEFT's suffix rule reached the vision qkv
    assert (logits(ours, ex) - logits(theirs, ex)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# FP8 matmuls (--fp8)


def fp8_reference(t, dtype):
    """The tensorwise rule written out: t scaled so its absolute max is dtype's largest value, rounded to dtype, then
    scaled back (in float64)."""
    scale = torch.finfo(dtype).max / t.abs().max().double()
    return (t.double() * scale).to(dtype).double() / scale


def test_fp8_linear_is_the_tensorwise_formula_and_close_to_the_linear():
    """FP8Linear's output and gradients equal the formula (inputs and weight in e4m3, the output's gradient in e5m2, each
    with its own absolute-max scale; fp32 accumulation), on a row count that needs padding to 16; and stay within the
    format's rounding (e4m3: 3 mantissa bits) of the plain Linear's."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64, requires_grad=True)
    expected = linear(x)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    plain = [x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()]
    x.grad = linear.weight.grad = linear.bias.grad = None
    linear.__class__ = lora.FP8Linear
    out = linear(x)
    out.backward(grad)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    x64, w64, g64 = fp8_reference(x.detach(), e4m3), fp8_reference(linear.weight.detach(), e4m3), fp8_reference(grad, e5m2)
    formula = [x64 @ w64.T + linear.bias.detach().double(), g64 @ w64, (g64.reshape(-1, 48).T @ x64.reshape(-1, 64))]
    for got, want in zip([out, x.grad, linear.weight.grad], formula):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear.bias.grad, plain[2])
    for got, want, bound in zip([out, x.grad, linear.weight.grad], [expected, *plain[:2]], [0.06, 0.1, 0.1]):
        assert ((got - want).norm() / want.norm()).item() < bound


def test_fp8_product_off_the_gpu_is_torchs_scaled_mm():
    """lora._mm8 off the GPU (an fp32 matmul of the fp8 values) gives what torch._scaled_mm, the GPU path, gives for
    the same operands and scales (its CPU version is slow, not different), e4m3 x e4m3 and e5m2 x e4m3."""
    torch.manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, a_scale = lora._fp8(torch.randn(32, 64), dtype)
        b, b_scale = lora._fp8(torch.randn(48, 64), torch.float8_e4m3fn)
        want = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.float32)
        assert torch.allclose(lora._mm8(a, a_scale, b.t(), b_scale, torch.float32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_fp8_linears_swaps_the_language_models_linears_only(tiny, train_type):
    """Every Linear of the language model's layers multiplies in fp8 (a LoRA layer's base, not its A and B), lm_head
    and the vision tower do not; the parameters and their names are the model's (checkpoints do not change)."""
    model = load(tiny[1])
    if train_type == "lora":
        lora.add_lora(model, 8, 32)
    names = list(model.state_dict())
    swapped = lora.fp8_linears(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, lora.FP8Linear)}
    layers = model.config.get_text_config().num_hidden_layers
    assert swapped == len(fp8) == 7 * layers  # q, k, v, o, gate, up, down
    assert all(".language_model.layers." in n and ".lora_" not in n for n in fp8)
    assert train_type == "full" or all(n.endswith(".base_layer") for n in fp8)
    assert list(model.state_dict()) == names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm's GPU kernel")
def test_gpu_fp8_linear_equals_the_product_off_the_gpu():
    """On the GPU, FP8Linear (torch._scaled_mm, eager and compiled, bf16 in and out) gives the output and gradients that
    the same fp8 operands give off the GPU (an fp32 matmul), to bf16's rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False)
    linear.__class__ = lora.FP8Linear
    x, grad = torch.randn(2, 45, 256), torch.randn(2, 45, 512)

    def run(layer, device, dtype):
        layer = layer.to(device, dtype)
        layer.weight.grad = None
        inputs = x.to(device, dtype).requires_grad_()
        out = layer(inputs)
        out.backward(grad.to(device, dtype))
        return [t.float().cpu() for t in (out, inputs.grad, layer.weight.grad)]

    # the operands quantised from the same bf16 values on both sides
    want = run(copy.deepcopy(linear), "cpu", torch.bfloat16)
    for layer in (copy.deepcopy(linear), torch.compile(copy.deepcopy(linear))):
        for got, expected in zip(run(layer, "cuda", torch.bfloat16), want):
            assert ((got - expected).norm() / expected.norm()).item() < 0.01
