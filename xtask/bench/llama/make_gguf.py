#!/usr/bin/env python3
"""Makes the GGUF files of the llama.cpp side of `cargo xtask bench-infer`.

A randomly initialised transformers `Qwen2ForCausalLM` with the shapes of Phantom-0.5B's decoder
(Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied head),
saved with the Qwen tokenizer of the test fixtures, converted by the `convert_hf_to_gguf.py` of
the llama.cpp that node-llama-cpp bundles (F32, F16, Q8_0), and quantized to Q4_0 by the
`llama_model_quantize` of its prebuilt libllama (node-llama-cpp has no quantize API).

    python make_gguf.py --llama-cpp DIR --lib DIR --tokenizer DIR --out DIR

Everything goes to stderr except nothing: the files are the output.
"""

import argparse
import ctypes
import os
import shutil
import subprocess
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def log(*args):
    print("make_gguf:", *args, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source (convert_hf_to_gguf.py)")
    ap.add_argument("--lib", required=True, help="folder with the prebuilt libllama.so")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    hf = os.path.join(args.out, "qwen2-0.5b-random")
    if not os.path.exists(os.path.join(hf, "model.safetensors")):
        log("writing a random Qwen2-0.5B-shaped model")
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32",
            bos_token_id=151643, eos_token_id=151645,
        )
        model = Qwen2ForCausalLM(config).eval()
        model.save_pretrained(hf, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(args.tokenizer, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(hf, name))

    env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py"))
    for outtype in ("f32", "f16", "q8_0"):
        dst = os.path.join(args.out, f"qwen2-0.5b-{outtype}.gguf")
        if os.path.exists(dst):
            continue
        log(f"converting to {outtype}")
        subprocess.run(
            [sys.executable, os.path.join(args.llama_cpp, "convert_hf_to_gguf.py"), hf,
             "--outtype", outtype, "--outfile", dst],
            check=True, env=env, stdout=sys.stderr,
        )

    q4 = os.path.join(args.out, "qwen2-0.5b-q4_0.gguf")
    if not os.path.exists(q4):
        log("quantizing to Q4_0 with libllama")
        libs = sorted(os.listdir(args.lib))
        for dep in [f for f in libs if f.startswith("libggml-base")]:
            ctypes.CDLL(os.path.join(args.lib, dep), mode=ctypes.RTLD_GLOBAL)
        (name,) = [f for f in libs if f.startswith("libllama") and "common" not in f]
        lib = ctypes.CDLL(os.path.join(args.lib, name))

        class QuantizeParams(ctypes.Structure):
            # llama_model_quantize_params of this llama.cpp's include/llama.h.
            _fields_ = [
                ("nthread", ctypes.c_int32),
                ("ftype", ctypes.c_int32),
                ("output_tensor_type", ctypes.c_int32),
                ("token_embedding_type", ctypes.c_int32),
                ("allow_requantize", ctypes.c_bool),
                ("quantize_output_tensor", ctypes.c_bool),
                ("only_copy", ctypes.c_bool),
                ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool),
                ("dry_run", ctypes.c_bool),
                ("imatrix", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p),
                ("tt_overrides", ctypes.c_void_p),
                ("prune_layers", ctypes.c_void_p),
                ("max_buf_size", ctypes.c_size_t),
            ]

        lib.llama_backend_init()
        lib.llama_model_quantize_default_params.restype = QuantizeParams
        params = lib.llama_model_quantize_default_params()
        params.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = os.cpu_count() or 1
        lib.llama_model_quantize.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
        src = os.path.join(args.out, "qwen2-0.5b-f32.gguf").encode()
        rc = lib.llama_model_quantize(src, q4.encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc})")


if __name__ == "__main__":
    main()
