
import pytest
import torch

import enat
from tests.helpers import random_model, tiny_config


def _sd(cfg):
    return random_model(cfg, seed=4).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module", "path", "file", "bytes"])
def test_round_trip_in_every_form(tmp_path, wrap):
    cfg = tiny_config()
    sd = _sd(cfg)
    src = {"plain": sd, "model": {"model": sd, "step": 3}, "state_dict": {"state_dict": sd},
           "module": {f"module.{k}": v for k, v in sd.items()}}.get(wrap)
    if wrap in ("path", "file", "bytes"):
        p = tmp_path / "nnet_ema.pth"
        torch.save(sd, p)
        src = str(p) if wrap == "path" else open(p, "rb") if wrap == "file" else p.read_bytes()
    m = enat.ENAT.from_official(src, cfg)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not m.training


def test_position_ids_buffer_is_ignored():
    cfg = tiny_config()
    sd = dict(_sd(cfg))
    sd["x_embedder.position_ids"] = torch.arange(cfg.seq_len)[None]
    enat.ENAT.from_official(sd, cfg)


def test_missing_unexpected_and_shape_errors_name_the_keys():
    cfg = tiny_config()
    sd = dict(_sd(cfg))
    del sd["blocks.0.attn.kv.A.weight"]
    sd["blocks.9.attn.q.weight"] = torch.zeros(3)
    sd["x_embedder.position_embeddings.weight"] = torch.zeros(99, cfg.dim)
    with pytest.raises(ValueError) as e:
        enat.ENAT.from_official(sd, cfg)
    msg = str(e.value)
    assert "missing keys (1): blocks.0.attn.kv.A.weight" in msg
    assert "unexpected keys (1): blocks.9.attn.q.weight" in msg
    assert "x_embedder.position_embeddings.weight: checkpoint (99, 32) vs model (16, 32)" in msg


def test_wrong_preset_for_checkpoint_is_a_clear_error():
    sd = _sd(tiny_config())
    with pytest.raises(ValueError, match="shape mismatches"):
        enat.ENAT.from_official(sd, tiny_config(dim=64))


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        enat.ENAT.from_official(str(tmp_path / "nope.pth"), tiny_config())
    p = tmp_path / "x.pth"
    torch.save([1, 2, 3], p)
    with pytest.raises(ValueError, match="expected a state dict"):
        enat.ENAT.from_official(str(p), tiny_config())
    torch.save({"a": 1}, p)
    with pytest.raises(ValueError, match="no tensors"):
        enat.ENAT.from_official(str(p), tiny_config())


class _Payload:
    """Pickles to a call of os.system: unpickling it with weights_only=False would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path):
    """A tampered checkpoint (a state dict with a pickled payload beside the tensors) is refused, naming the
    file, by every loader: path, bytes, open file; ENAT, VQGAN, PatchVQ, the FID Inception. Nothing ran."""
    import io

    from enat.patch_vq import PatchVQ

    marker = tmp_path / "ran"
    p = tmp_path / "nnet_ema.pth"
    torch.save({**_sd(tiny_config()), "extra": _Payload(marker)}, p)
    data = p.read_bytes()
    loaders = [lambda s: enat.read_state_dict(s), lambda s: enat.ENAT.from_official(s, tiny_config()),
               lambda s: enat.VQGAN.from_official(s, "mage-f16"), lambda s: PatchVQ.from_state_dict(s),
               lambda s: enat.FIDInception.from_pytorch_fid(s)]
    for load in loaders:
        for source in (str(p), data, io.BytesIO(data)):
            with pytest.raises(ValueError, match="refused, loading it would run pickled code"):
                load(source)
    with pytest.raises(ValueError, match=f"checkpoint {p}: refused"):
        enat.read_state_dict(str(p))
    assert not marker.exists()
    # the same weights saved as a plain state dict load as before
    torch.save(_sd(tiny_config()), p)
    assert enat.read_state_dict(str(p)).keys() == _sd(tiny_config()).keys()


def test_official_state_dict_layout_enat_l():
    with torch.device("meta"):
        m = enat.ENAT(enat.ENATConfig.preset("enat-l"))
    sd = m.state_dict()
    assert len(sd) == 358
    keys = list(sd)
    assert keys[:2] == ["x_embedder.word_embeddings.weight", "x_embedder.position_embeddings.weight"]
    assert keys[-5:] == ["mlm_layer.bias", "mlm_layer.fc.weight", "mlm_layer.fc.bias", "mlm_layer.ln.weight",
                         "mlm_layer.ln.bias"]
    assert sd["blocks.23.adaLN_modulation.1.weight"].shape == (8192, 1024)
    assert sd["blocks.0.attn.kv.B.weight"].shape == (2048, 1024)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1024)
    assert sd["mlm_layer.bias"].shape == (1, 1, 1025)
