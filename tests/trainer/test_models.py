import json

import open_clip
import torch

from trainer.models import (TINY_MODEL_CFG, config_name, count_parameters, create_model,
                            load_model, model_config_record)


def test_tiny_model_is_small_and_low_resolution():
    model, pre_train, pre_val, tok = create_model("tiny")
    assert 2_000_000 < count_parameters(model) < 6_000_000
    assert tok(["a red star"]).shape == (1, TINY_MODEL_CFG["text_cfg"]["context_length"])
    img, txt, scale = model(torch.zeros(2, 3, 32, 32), tok(["a", "b"]))
    assert img.shape == txt.shape == (2, TINY_MODEL_CFG["embed_dim"])


def test_config_dicts_get_stable_names():
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["embed_dim"] = 32
    assert config_name(cfg) == config_name(json.loads(json.dumps(cfg)))
    model, *_ = create_model(cfg)
    assert model.text_projection.shape[1] == 32


def test_checkpoint_loads_back_here_and_in_open_clip(tmp_path):
    model, *_ = create_model("tiny")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    record = model_config_record("tiny")
    (run / "model_config.json").write_text(json.dumps(record))
    (run / "model_configs").mkdir()
    (run / "model_configs" / "tiny.json").write_text(json.dumps(record["model_cfg"]))
    # as open_clip_train saves under DDP: "module." prefixes, no model name inside
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "name": "run", "state_dict": state, "optimizer": {}},
               run / "checkpoints" / "epoch_2.pt")
    loaded, pre_val, tok = load_model(run)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    loaded2, _, _ = load_model(run / "checkpoints" / "epoch_2.pt")
    assert torch.equal(loaded2.logit_scale, model.logit_scale)
    # DataComp's evaluation path: register the run's configs, then pretrained=<checkpoint>
    open_clip.add_model_config(run / "model_configs")
    oc, _, _ = open_clip.create_model_and_transforms("tiny", pretrained=str(run / "checkpoints" / "epoch_2.pt"))
    assert torch.equal(oc.visual.conv1.weight, model.visual.conv1.weight)


def test_tiny_context_holds_every_english_caption_and_eval_prompt(tmp_path):
    """`tiny` reads 16 tokens: no English caption of the synthetic pool, nor an eval prompt, is
    cut (only the non-English and junk ones may be); a longer caption template fails here."""
    import pyarrow.parquet as pq

    from pools.synth import CONCEPTS, EVAL_TEMPLATES, SynthConfig, concept_name, generate

    generate(tmp_path / "pool", SynthConfig(samples=2000, seed=5, images=False))
    rows = pq.read_table(tmp_path / "pool" / "metadata").to_pandas()
    truth = pq.read_table(tmp_path / "pool" / "ground_truth.parquet").to_pandas()
    rows = rows.merge(truth[["uid", "language", "caption_kind"]], on="uid")
    english = rows[rows["language"] == "en"]["text"].tolist()
    assert len(english) > 1000 and {"match_plain", "mismatch", "off_target"} <= set(rows["caption_kind"])
    _, _, _, tok = create_model("tiny")
    context = TINY_MODEL_CFG["text_cfg"]["context_length"]
    assert context == 16
    prompts = [t.format(c=concept_name(c)) for t in EVAL_TEMPLATES for c in range(len(CONCEPTS))]
    for texts in (english, prompts):
        ids = tok(texts)
        assert ids.shape[1] == context
        assert (ids[:, -1] == 0).all(), [t for t, i in zip(texts, ids) if i[-1] != 0][:3]  # not cut
