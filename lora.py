r"""
lora.py: LoRA layers, freezing, parameter groups, PEFT-compatible adapter save/load, merge + export; FP8 matmuls.

    import lora
    model = lora.add_lora(model, rank=8, alpha=32, dropout=0.05)           # every Linear of the language model
    model = lora.add_lora(model, 8, 32, 0.0, target_modules=["q_proj", "v_proj"])
    model = lora.add_lora(model, 8, 32, 0.0, target_modules=r".*visual\.(blocks\.\d+\.attn\.qkv|merger\..*)")  # regex
    trainable, total = lora.set_trainable(model, "lora", freeze_vit=True, freeze_llm=False, freeze_aligner=True)
    optimizer = torch.optim.AdamW(lora.param_groups(model, lr=1e-4, weight_decay=0.1, lorap_lr_ratio=16))
    with lora.disable_adapters(model): ref_logits = model(**batch).logits   # the base model, for DPO/GRPO references
    lora.save_adapter(model, "out/checkpoint-100")                          # adapter_config.json + adapter_model.safetensors
    lora.load_adapter(model, "out/checkpoint-100")

Merge an adapter into its base and write a full Hugging Face checkpoint (loads in transformers and vLLM as is):
    python lora.py merge --model Qwen/Qwen2.5-VL-3B-Instruct --adapter out/checkpoint-100 --out merged
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT saves keys under its wrapper's path: base_model (LoraModel) . model (ours)


class LoRALinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * scaling, with the base Linear frozen and its weight tensor kept as is."""

    def __init__(self, base_layer, rank, alpha, dropout=0.0, use_rslora=False, dtype=None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        # rsLoRA: alpha / sqrt(r) keeps the update's size stable as the rank grows (Kalajdzievski 2023)
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kwargs = dict(bias=False, device=base_layer.weight.device, dtype=dtype or base_layer.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kwargs)
        self.lora_B = nn.Linear(rank, self.out_features, **kwargs)
        # PEFT's init: A like nn.Linear's default, B zero, so the wrapped model starts exactly equal to the base
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base_layer.requires_grad_(False)
        self.merged = self.disabled = False
        self.train(base_layer.training)  # wrapping a model in eval() must not switch dropout on

    @property
    def weight(self):  # model code that reads `proj.weight.dtype` keeps working on a wrapped layer
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        lora_x = self.dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold B @ A * scaling into the base weight (computed in fp32, so a bf16 base rounds once)."""
        if not self.merged:
            weight = self.base_layer.weight
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            weight.copy_((weight.float() + delta).to(weight.dtype))
            self.merged = True


# ----------------------------------------------------------------------------------------------------------------
# Which modules: model parts and target matching


def model_part(name):
    """A module or parameter name -> 'vit', 'aligner' (the merger that feeds vision into the LM) or 'llm'."""
    parts = name.split(".")
    if "visual" not in parts:
        return "llm"  # the language model, its embeddings and lm_head
    after = parts[parts.index("visual") + 1 : parts.index("visual") + 2]
    # Qwen3-VL also feeds intermediate vision layers into the LM through deepstack mergers
    return "aligner" if after and after[0] in ("merger", "deepstack_merger_list") else "vit"


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _peft_selects(spec, name):
    """PEFT's rule: a string is a regex matched in full; a list matches a name equal to or ending in `.item`."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def add_lora(model, rank, alpha, dropout=0.0, target_modules=None, use_rslora=False, dtype=None):
    """Wrap the targeted nn.Linear modules in LoRALinear and freeze every base parameter. Modifies `model` in place.

    target_modules: None or 'all-linear': every Linear of the language model except lm_head;
    a list of names: the language model's Linears whose last name component is listed (q_proj v_proj ...);
    a regex string: full match on the module's full name (as PEFT does), which may reach model.visual.
    dtype: the LoRA weights' dtype; default the base weight's (FSDP2 wants one dtype per sharded unit)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora() them first or load into a fresh model")
    if isinstance(target_modules, (list, tuple)) and len(target_modules) == 1:
        target_modules = target_modules[0]  # a command line gives ['.*qkv'] for one regex
    if isinstance(target_modules, str) and re.fullmatch(r"[\w-]+", target_modules):
        target_modules = [target_modules]  # one plain name (q_proj, all-linear), not a regex
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(target_modules, str):
        chosen = [(n, m) for n, m in linears if re.fullmatch(target_modules, n)]
    else:
        names = set(target_modules or ["all-linear"])
        all_linear = "all-linear" in names
        chosen = [(n, m) for n, m in linears if model_part(n) == "llm"
                  and ((all_linear and not n.endswith("lm_head")) or n.split(".")[-1] in names)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n, _ in linears})
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear. Names take the last component "
                         f"({', '.join(suffixes[:12])}); a regex matches full names such as "
                         f"{', '.join(n for n, _ in linears[:: max(1, len(linears) // 4)][:4])}")
    model.requires_grad_(False)
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha, dropout, use_rslora, dtype))
    return model


# ----------------------------------------------------------------------------------------------------------------
# FP8 matmuls (--fp8): the language model's Linears multiply in float8, as torchtitan's "tensorwise" recipe does (one
# scale per tensor, from its absolute max): inputs and weights in e4m3, gradients in e5m2 (more range, less
# precision), fp32 accumulation, the output in the input's dtype. The weights stay as they are (their master dtype,
# FSDP2's bf16 compute copy); only the matmuls change, so checkpoints, LoRA and weight sync see plain Linears.


def _fp8(t, dtype):
    """t scaled into dtype's range by its absolute max -> (t in dtype, the fp32 scale that multiplies it back)."""
    top = torch.finfo(dtype).max
    scale = top / t.abs().max().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _mm8(a, a_scale, b, b_scale, out_dtype):
    """(a * a_scale) @ (b * b_scale) for fp8 a [M, K] and b [K, N], accumulated in fp32: on the GPU torch._scaled_mm
    (b column-major, as its kernel requires); elsewhere the same products in an fp32 matmul (a product of two fp8
    values is exact in fp32), since torch._scaled_mm on CPU is a reference loop ~3,000x slower."""
    if a.is_cuda:
        return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_scale, scale_b=b_scale,
                                out_dtype=out_dtype)
    return ((a.float() @ b.float()) * (a_scale * b_scale)).to(out_dtype)


class _FP8Matmul(torch.autograd.Function):
    """x [N, in] @ weight.T [in, out], with N, in and out multiples of 16 (torch._scaled_mm's rule on the GPU)."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_scale = _fp8(x, torch.float8_e4m3fn)
        w8, w_scale = _fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)  # (the input kept in fp8: half the memory of bf16)
        ctx.weight_grad = weight.requires_grad
        return _mm8(x8, x_scale, w8.t(), w_scale, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        g8, g_scale = _fp8(grad, torch.float8_e5m2)
        grad_x = _mm8(g8, g_scale, w8, w_scale, grad.dtype)
        grad_w = None
        if ctx.weight_grad:  # (a frozen LoRA base needs none)
            grad_w = _mm8(g8.t().contiguous(), g_scale, x8, x_scale, grad.dtype)
        return grad_x, grad_w


class FP8Linear(nn.Linear):
    """nn.Linear whose matmul runs in float8 (fp8_linears swaps a Linear's class to it: same parameters, same names)."""

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        pad = -rows.shape[0] % 16  # zero rows: they change neither a scale nor another row
        out = _FP8Matmul.apply(nn.functional.pad(rows, (0, 0, 0, pad)) if pad else rows, self.weight)
        out = (out[: rows.shape[0]] if pad else out).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def fp8_linears(model):
    """Swap the language model's Linears (a LoRA layer's base included; lm_head, the vision tower, LoRA's own A and B
    and any Linear whose sizes are not multiples of 16 excluded) to FP8Linear, in place. -> how many were swapped."""
    swapped = 0
    for name, module in model.named_modules():
        if (type(module) is nn.Linear and model_part(name) == "llm" and not name.endswith("lm_head")
                and ".lora_" not in name and module.in_features % 16 == 0 and module.out_features % 16 == 0):
            module.__class__ = FP8Linear
            swapped += 1
    return swapped


# ----------------------------------------------------------------------------------------------------------------
# Training: what is trainable, optimizer groups, the reference model


def set_trainable(model, train_type, freeze_vit=True, freeze_llm=False, freeze_aligner=True, master_dtype=None):
    """full: every parameter outside the frozen parts; lora: only LoRA weights outside the frozen parts.
    master_dtype (torch.float32): the trainable weights' copy that AdamW updates, in that dtype (bf16 weights lose
    updates below ~0.4% of a weight); the frozen ones keep theirs. Returns (trainable, total) parameter counts."""
    if train_type not in ("full", "lora"):
        raise ValueError(f"train_type must be 'full' or 'lora', got {train_type!r}")
    frozen = {part for part, flag in (("vit", freeze_vit), ("llm", freeze_llm), ("aligner", freeze_aligner)) if flag}
    trainable = total = 0
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(model_part(name) not in frozen and (train_type == "full" or is_lora))
        if p.requires_grad and master_dtype is not None:
            p.data = p.data.to(master_dtype)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def param_groups(model, lr, weight_decay, lorap_lr_ratio=None, vit_lr=None, aligner_lr=None):
    """AdamW groups over the trainable parameters, each with a 'name' for logging.
    Biases and norm weights (1-D) get no weight decay; vit/aligner get their own lr when given;
    LoRA+ (Hayou et al. 2024) trains B at lorap_lr_ratio x the lr of A, which learns features faster."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = model_part(name)
        part_lr = {"vit": vit_lr, "aligner": aligner_lr}.get(part)
        key, group_lr = (part if part_lr is not None else "default"), (part_lr if part_lr is not None else lr)
        if lorap_lr_ratio and ".lora_B." in name:
            key, group_lr = key + ".lora_B", group_lr * lorap_lr_ratio
        decay = weight_decay if p.ndim >= 2 else 0.0
        key += "" if p.ndim >= 2 else ".no_decay"
        groups.setdefault(key, {"name": key, "params": [], "lr": group_lr, "weight_decay": decay})["params"].append(p)
    return list(groups.values())


@contextlib.contextmanager
def disable_adapters(model):
    """Run the base model: the LoRA path is off inside the block (the DPO/GRPO reference, with no second copy)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back. Returns the model."""
    for name, module in lora_layers(model):
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.base_layer)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Adapter files, in PEFT's format: `PeftModel.from_pretrained(base, dir)` and vLLM's LoRA loader read them


def _peft_target_modules(model):
    """The simplest target_modules with which PEFT wraps exactly the modules we wrapped: the suffix list when
    it selects nothing else (Qwen2.5-VL's vision MLP reuses gate_proj/up_proj/down_proj), else a regex."""
    layers = lora_layers(model)
    wrapped = {n for n, _ in layers}
    internal = {f"{n}.{c}" for n, m in layers for c, _ in m.named_modules() if c}
    names = [n for n, _ in model.named_modules() if n and n not in internal]
    suffixes = sorted({n.split(".")[-1] for n in wrapped})
    prefix = os.path.commonprefix([n.split(".") for n in wrapped])  # e.g. model.language_model.layers
    under_prefix = re.escape(".".join(prefix)) + r"\..*\.(?:" + "|".join(map(re.escape, suffixes)) + ")"
    by_layer = "|".join(sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in wrapped}))
    for spec in (suffixes, under_prefix, by_layer):
        if {n for n in names if _peft_selects(spec, n)} == wrapped:
            return spec
    return "|".join(re.escape(n) for n in sorted(wrapped))


def _lora_keys(state_dict):
    """LoRA entries of a state dict, named as in the plain model (wrapper infixes of compile/checkpointing removed)."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            out[key.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")] = value
    return out


def save_adapter(model, out_dir, state_dict=None, base_model_name_or_path=None):
    """Write adapter_model.safetensors (LoRA weights, PEFT key names) and adapter_config.json.
    An FSDP2-sharded model: pass the full, gathered `state_dict` (get_model_state_dict(..., full_state_dict=True))."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora() first")
    first = layers[0][1]
    weights = _lora_keys(model.state_dict() if state_dict is None else state_dict)
    if any(hasattr(v, "full_tensor") for v in weights.values()):
        raise ValueError("the LoRA weights are sharded (FSDP2): pass state_dict=get_model_state_dict(model, "
                         "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) and save on rank 0")
    weights = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {"peft_type": "LORA", "task_type": None, "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
              "target_modules": _peft_target_modules(model), "use_rslora": first.use_rslora, "use_dora": False,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None)}
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_weights(adapter_dir):
    """adapter_model.safetensors -> {name in the plain model with LoRA added: tensor}, e.g. to resume an FSDP2 run."""
    weights = {}
    for key, value in load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)).items():
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        # PEFT names weights `lora_A.<adapter name>.weight` in memory and `lora_A.weight` in files: accept both
        weights[re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)] = value
    return weights


def load_adapter(model, adapter_dir):
    """Load an adapter saved by save_adapter or by PEFT; adds the LoRA layers first when the model has none."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported (peft_type LORA, bias none, no "
                         f"{', '.join(unsupported) or 'extras'}); got peft_type={config.get('peft_type')!r}")
    weights, modules = {}, dict(model.named_modules())
    for key, value in read_adapter_weights(adapter_dir).items():
        # adapters trained with transformers < 4.52 name the LM `model.layers...` and the vision tower `visual...`
        for old, new in (("model.", "model.language_model."), ("visual.", "model.visual.")):
            if key.startswith(old) and key.rsplit(".", 2)[0] not in modules and \
                    (new + key[len(old):]).rsplit(".", 2)[0] in modules:
                key = new + key[len(old):]
        weights[key] = value
    rank, alpha, use_rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    if not lora_layers(model):
        # wrap exactly the modules the file has weights for: PEFT's and our target rules need not agree
        targets = sorted({k.rsplit(".", 2)[0] for k in weights})
        add_lora(model, rank, alpha, config.get("lora_dropout", 0.0), "|".join(map(re.escape, targets)), use_rslora)
    for name, m in lora_layers(model):
        if (m.rank, m.alpha, m.use_rslora) != (rank, alpha, use_rslora):
            raise ValueError(f"{name} has r={m.rank}, alpha={m.alpha}, rslora={m.use_rslora} but {adapter_dir} has "
                             f"r={rank}, alpha={alpha}, rslora={use_rslora}")
    expected = set(_lora_keys(model.state_dict()))
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{adapter_dir} does not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    model.load_state_dict(weights, strict=False)  # strict=False: the file holds only the LoRA part
    return model


# ----------------------------------------------------------------------------------------------------------------
# Command line: merge an adapter into its base model

WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5)$|.*\.index\.json$")


def merge_main(argv):
    parser = argparse.ArgumentParser(prog="python lora.py merge", description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--model", required=True, help="the base model: a local folder, a hub id or a tiny model's name")
    parser.add_argument("--adapter", required=True, help="a folder with adapter_config.json + adapter_model.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: the base checkpoint's own dtype")
    args = parser.parse_args(argv)
    import data
    from transformers import AutoModelForImageTextToText

    base = data.resolve_model(args.model)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    model = merge_lora(load_adapter(model, args.adapter))
    model.save_pretrained(args.out)
    if not os.path.isdir(base):  # a hub id: the non-weight files are in (or go to) the local hub cache
        from huggingface_hub import snapshot_download

        base = snapshot_download(base, ignore_patterns=["*.safetensors", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5"])
    # tokenizer, chat template and processor configs, so transformers and vLLM load the output folder directly
    for name in sorted(os.listdir(base)):
        source, target = os.path.join(base, name), os.path.join(args.out, name)
        if os.path.isfile(source) and not WEIGHT_FILE.fullmatch(name) and not os.path.exists(target):
            shutil.copyfile(source, target)
    print(f"merged {args.adapter} into {args.model} -> {args.out}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
