"""genai_config.json and tokenizer_config.json: what onnxruntime-genai needs to load and run an ort artifact.

onnxruntime-genai has no StarCoder2 type, but runs any decoder graph with the usual I/O names
(docs/onnxruntime-gqa.md); "decoder" is one of the types it accepts. With a sliding window the graph's
GroupQueryAttention nodes keep a window-sized cache (sliding_window_cache=1), which genai
sizes from the `sliding_window` block: capacity = window_size + cache_slack (0: its default).
"""
from __future__ import annotations

import json
from pathlib import Path

from sc2deploy.config import Config
from sc2deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, past_name, present_name

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENAI_MODEL_TYPE = "decoder"


def genai_config(config: Config, model_file: str) -> dict:
    decoder = {
        "filename": model_file,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": config.head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                   "past_key_names": past_name("%d", "key"), "past_value_names": past_name("%d", "value")},
        "outputs": {"logits": LOGITS, "present_key_names": present_name("%d", "key"),
                    "present_value_names": present_name("%d", "value")},
    }
    if config.windowed:
        decoder["sliding_window"] = {"window_size": config.sliding_window, "slide_key_value_cache": False,
                                     "slide_inputs": False, "layers": list(range(config.num_hidden_layers)),
                                     "cache_slack": 0}
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id,
            "context_length": config.max_position_embeddings,
            "vocab_size": config.vocab_size,
            "decoder": decoder,
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "early_stopping": True,
            "max_length": config.max_position_embeddings, "min_length": 0,
            "past_present_share_buffer": True, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def tokenizer_config(config: Config) -> dict:
    """The minimal tokenizer_config.json og.Tokenizer wants next to tokenizer.json."""
    eos = "<|endoftext|>"
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "model_max_length": config.max_position_embeddings}


def write_genai_files(folder: Path, config: Config, model_file: str) -> None:
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(config, model_file), indent=2) + "\n")
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config(config), indent=2) + "\n")
