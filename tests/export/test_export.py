import pytest
import torch

from torchslim.export import export_onnx


def test_exported_cnn_takes_any_batch_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from conftest import tiny_bundle

    bundle = tiny_bundle()
    assert export_onnx(bundle.model, bundle.example_inputs(2), tmp_path / "m.onnx") == "dynamo"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):
        x = bundle.example_inputs(batch)
        out = session.run(None, {"input_0": x.numpy()})[0]
        assert torch.allclose(torch.from_numpy(out), bundle.model(x), atol=1e-4)


def test_exported_encoder_takes_any_batch_and_sequence_length(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    export_onnx(bundle.model, bundle.example_inputs(2), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for sentences in (["Short one."], ["A somewhat longer sentence with more tokens in it.", "And a second one."]):
        ids, mask = bundle.preprocess(sentences)
        out = session.run(None, {"input_0": ids.numpy(), "input_1": mask.numpy()})[0]
        with torch.inference_mode():
            assert torch.allclose(torch.from_numpy(out), bundle.model(ids, mask), atol=1e-4)
