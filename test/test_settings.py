"""The node's defaults and the model/adapter resolution shared by the node, the CLI and replay."""
import os

from phi3v_spatial import paths, settings


def _fake_embedded(monkeypatch, tmp_path):
    model = tmp_path / "models" / paths.EMBEDDED_MODEL_NAME
    adapter = tmp_path / "models" / (paths.EMBEDDED_MODEL_NAME + "-lora-spatial")
    model.mkdir(parents=True)
    adapter.mkdir()
    monkeypatch.setattr(paths, "default_model_dir", lambda: str(model))
    monkeypatch.setattr(paths, "default_adapter_dir", lambda: str(adapter))
    return str(model), str(adapter)


def test_embedded_adapter_is_the_default_of_the_embedded_model_only(monkeypatch, tmp_path):
    model, adapter = _fake_embedded(monkeypatch, tmp_path)
    d = settings.node_defaults()
    assert d["adapters"] == [f"spatial={adapter}"] and d["active_adapter"] == "spatial"
    default = {"spatial": adapter}
    assert settings.resolve_model_and_adapters("", default, "spatial") == (model, default, "spatial")
    assert settings.resolve_model_and_adapters(model, default, "spatial") == (model, default, "spatial")
    # another model with the adapters left at their default: nothing that cannot fit is loaded
    assert settings.resolve_model_and_adapters("microsoft/Phi-3.5-vision-instruct", default, "spatial") == (
        "microsoft/Phi-3.5-vision-instruct", {}, "")
    # adapters chosen by the user are kept
    mine = {"mine": str(tmp_path / "mine")}
    assert settings.resolve_model_and_adapters("/models/x", mine, "mine") == ("/models/x", mine, "mine")


def test_without_an_embedded_adapter_there_is_no_default(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "default_adapter_dir", lambda: str(tmp_path / "absent"))
    d = settings.node_defaults()
    assert d["adapters"] == [] and d["active_adapter"] == ""
    assert os.path.isabs(settings.resolve_model_and_adapters("", {}, "")[0])


def test_adapter_folders_with_the_same_name_both_load():
    assert settings.parse_adapters(["/a/spatial", "/b/spatial/", "/c/other"]) == {
        "spatial": "/a/spatial", "spatial-2": "/b/spatial/", "other": "/c/other"}


def test_topic_spec_suffixes_force_the_message_type():
    assert settings.split_topic_spec("/cam/image:compressed") == ("/cam/image", "compressed")
    assert settings.split_topic_spec(" cam/image_raw:raw ") == ("cam/image_raw", "raw")
    assert settings.split_topic_spec("/cam/image/compressed") == ("/cam/image/compressed", None)


def test_engine_options_come_from_the_node_parameters():
    """The node and replay build the engine's reuse options from the same parameters and defaults."""
    from phi3v_spatial.engine.engine import EngineOptions
    from phi3v_spatial.replay.params import ReplaySettings

    opts = settings.engine_options(settings.node_defaults())
    assert opts == EngineOptions()  # the documented defaults are the engine's defaults
    p = {**settings.node_defaults(), "cache.vision_mb": 0.0, "cache.prefix_mb": 12.5, "relation_batch_size": 3}
    opts = settings.engine_options(p)
    assert (opts.vision_cache_mb, opts.prefix_cache_mb, opts.relation_batch_size) == (0.0, 12.5, 3)
    p_replay = {"cache.prefix_mb": 12.5, "relation_batch_size": 3, "quantization": "none"}
    rs = ReplaySettings.from_params(p_replay)
    assert rs.engine_options == settings.engine_options({**settings.node_defaults(), **p_replay})
    assert (rs.engine_options.prefix_cache_mb, rs.engine_options.relation_batch_size) == (12.5, 3)
