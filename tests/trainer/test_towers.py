"""Any open_clip model: a config file, a timm image tower with stochastic depth, and a Hugging
Face text tower from a local folder (built here: nothing is downloaded)."""

import json

import pytest
import torch

from trainer.models import create_model, load_model, read_model_config_file, with_image_drop_path
from trainer.train import build_parser, config_from_args, main

# timm's smallest ConvNeXt (convnext_atto, ~3.4M parameters) at 32 px, with the tiny text tower
CONVNEXT_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0, "image_size": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
WORDS = ("a photo of the red green blue yellow star circle square triangle dog cat bird car "
         "tree house small large on in with").split()


def tiny_hf_text_tower(folder):
    """A 2-layer BERT with a 30-word WordPiece vocabulary, saved as a local HF model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    return folder


def short_run(data, out, *extra):
    return main(["--scale", "tiny", "--data", str(data), "--out", str(out), "--allow-nonstandard",
                 "--samples-seen", "96", "--global-batch-size", "32", "--num-checkpoints", "1",
                 "--workers", "0", "--no-progress", "--no-tensorboard", "--warmup", "1", *extra])


def test_model_config_file_and_drop_path(tmp_path):
    path = tmp_path / "convnext-tiny-test.json"
    path.write_text(json.dumps(CONVNEXT_CFG))
    assert read_model_config_file(path) == ("convnext-tiny-test", CONVNEXT_CFG)
    name, cfg = with_image_drop_path("convnext-tiny-test", CONVNEXT_CFG, 0.1)
    assert name == "convnext-tiny-test-drop-path-0.1" and cfg["vision_cfg"]["timm_drop_path"] == 0.1
    assert "timm_drop_path" not in CONVNEXT_CFG["vision_cfg"]  # the original is left alone
    model, *_ = create_model({"model_name": name, "model_cfg": cfg})
    last = model.visual.trunk.stages[-1].blocks[-1].drop_path  # timm scales the rate up to 0.1
    assert last.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="own image tower, which has no stochastic depth"):
        config_from_args(build_parser().parse_args(["--scale", "tiny", "--data", "d", "--out", "o",
                                                    "--allow-nonstandard", "--image-drop-path", "0.1"]))
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="bad.json: an open_clip model config needs"):
        read_model_config_file(tmp_path / "bad.json")


@pytest.mark.slow
def test_a_timm_convnext_tower_with_stochastic_depth_trains(train_pool, tmp_path):
    path = tmp_path / "convnext-test.json"
    path.write_text(json.dumps(CONVNEXT_CFG))
    run = tmp_path / "convnext"
    m = short_run(train_pool / "shards", run, "--model-config", str(path), "--image-drop-path", "0.1")
    assert m["samples_seen"] == 96 and m["steps"] == 3
    assert m["model_name"] == "convnext-test-drop-path-0.1" and m["standard"] is False
    assert m["final_loss"] == m["final_loss"]  # not NaN
    assert json.loads((run / "config.json").read_text())["model_cfg"]["vision_cfg"]["timm_drop_path"] == 0.1
    model, _, _ = load_model(run)
    start, *_ = create_model({"model_name": m["model_name"], "model_cfg": json.loads(
        (run / "model_config.json").read_text())["model_cfg"]})
    stem = "visual.trunk.stem.0.weight"
    assert stem in model.state_dict()
    assert not torch.equal(model.state_dict()[stem], start.state_dict()[stem])  # it trained


@pytest.mark.slow
def test_a_local_hugging_face_text_tower_trains(train_pool, tmp_path):
    hf = tiny_hf_text_tower(tmp_path / "tiny-bert")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 24}}
    path = tmp_path / "hf-text-test.json"
    path.write_text(json.dumps(cfg))
    name, read = read_model_config_file(path)
    model, _, _, tok = create_model({"model_name": name, "model_cfg": read})
    from transformers import BertModel
    saved = BertModel.from_pretrained(hf).state_dict()
    k = "embeddings.word_embeddings.weight"
    assert torch.equal(model.text.transformer.state_dict()[k], saved[k])  # the folder's weights
    ids = tok(["a red star on a house"])
    assert ids.shape == (1, 24) and int(ids.max()) < 5 + len(WORDS)  # the folder's vocabulary
    run = tmp_path / "hf"
    m = short_run(train_pool / "shards", run, "--model-config", str(path))
    assert m["samples_seen"] == 96 and m["model_name"] == "hf-text-test"
    trained, _, tok2 = load_model(run)
    assert not torch.equal(trained.text.transformer.state_dict()[k], saved[k])
    assert torch.equal(tok2(["a red star"]), tok(["a red star"]))
