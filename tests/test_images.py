"""Image data sets and ImageStream: real files from shared/data, tiny fakes built in tmp_path."""

import functools
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.folders import DataFileError
from difflab.data.images import DatasetMissingError, TensorImages, load_image_dataset
from difflab.data.stream import ImageStream

# From shared/data/README.md (the MNIST section), which took them from the official description.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@functools.cache
def _load(name: str, root: Path, split: str):
    """Each real set is decoded once per test session (MNIST is 47 MB of pixels)."""
    return load_image_dataset(name, root, split)


# --- real data -----------------------------------------------------------------------------


def test_mnist_train_and_test(shared_data):
    train, info = _load("mnist", shared_data, "train")
    _, test_info = _load("mnist", shared_data, "test")
    assert (info.size, test_info.size, len(train)) == (60000, 10000, 60000)
    assert info.shape == (1, 32, 32) and info.num_classes == 10 and not info.flip
    assert train.images.shape == (60000, 1, 32, 32) and train.images.dtype == torch.uint8
    x, label = train[0]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert label == 5  # the famous first MNIST digit
    # The 2-pixel pad is uint8 0 everywhere, i.e. exactly -1 after scaling.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (train.images[:, :, border] == 0).all()
    assert train.images.max() == 255 and x[0, border].eq(-1).all()
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS


def test_fashion_has_6000_per_class(shared_data):
    train, info = _load("fashion", shared_data, "train")
    assert info.class_names[0] == "T-shirt/top" and info.shape == (1, 32, 32)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_cifar10_partial_copy_warns(shared_data):
    with pytest.warns(UserWarning, match="only 929 of 50000"):
        train, info = load_image_dataset("cifar10", shared_data, "train")
    assert info.size == 929 and info.shape == (3, 32, 32) and info.num_classes == 10 and info.flip
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # README: data_batch_1
    assert info.class_names[6] == "frog"


def test_cifar10_official_layout(tmp_path, monkeypatch):
    """Tiny pickled batches in torchvision's layout; its md5 check is the only thing faked."""
    from torchvision.datasets import cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)  # rows: 1024 R, G, B
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / batch).open("wb") as f:
            pickle.dump({"data": pixels, "labels": [3, 8]}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train, info = load_image_dataset("cifar10", tmp_path)
    assert info.size == 10 and info.shape == (3, 32, 32) and info.class_names[3] == "class3"
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(pixels[0]))  # CHW order
    assert train.labels[:2].tolist() == [3, 8]


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion", "FashionMNIST/raw/train-labels-idx1-ubyte.gz"),
        ("cifar10", "cifar-10-batches-py"),
        ("celeba64", "celeba/list_eval_partition.txt"),
    ],
)
def test_missing_data_says_where_it_belongs(tmp_path, name, expected):
    with pytest.raises(DatasetMissingError) as caught:
        load_image_dataset(name, tmp_path)
    assert str(tmp_path / expected) in str(caught.value)
    assert "data.download=true" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion, cifar10, celeba64, imagefolder"):
        load_image_dataset("imagenet", tmp_path)


def test_corrupt_idx_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + bytes(12))  # label magic in an image file
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte\.gz: IDX magic 0x801"):
        load_image_dataset("mnist", tmp_path)


def test_unzipped_torchvision_layout_is_read(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "t10k-images-idx3-ubyte").write_bytes(images + bytes(range(256)) * 6 + bytes(32))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x07\x02"
    )
    data, info = load_image_dataset("mnist", tmp_path, "test", image_size=28)
    assert info.size == 2 and info.shape == (1, 28, 28) and data.labels.tolist() == [7, 2]


# --- image folders and CelebA ----------------------------------------------------------------


def _save(path: Path, size: tuple[int, int], colour=(200, 30, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_classes_and_shapes(tmp_path):
    for cls in ("dogs", "cats"):
        for i, size in enumerate([(40, 30), (20, 50), (64, 64)]):
            _save(tmp_path / cls / f"{i}.png", size)
    data, info = load_image_dataset("imagefolder", tmp_path, image_size=16)
    assert info.class_names == ("cats", "dogs") and info.num_classes == 2 and info.size == 6
    assert info.shape == (3, 16, 16) and not info.flip
    assert [data[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    x, _ = data[1]
    assert x.shape == (3, 16, 16) and torch.allclose(x[0], torch.tensor(200 / 127.5 - 1))
    grey, grey_info = load_image_dataset("imagefolder", tmp_path / "cats", image_size=8, channels=1)
    assert grey_info.num_classes == 0 and grey[2][0].shape == (1, 8, 8) and grey[2][1] == 0
    assert data.verify() == 6


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetMissingError, match="does not exist"):
        load_image_dataset("imagefolder", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_dataset("imagefolder", tmp_path / "empty")
    _save(tmp_path / "some" / "good.png", (8, 8))
    (tmp_path / "some" / "bad.png").write_bytes(b"\x89PNG but not really")
    data, _ = load_image_dataset("imagefolder", tmp_path / "some", image_size=8)
    with pytest.raises(DataFileError, match=r"bad\.png"):
        data[0]  # sorted: bad.png comes first
    with pytest.raises(DataFileError, match=r"bad\.png"):
        data.verify()


def test_celeba64_crops_the_centre(tmp_path):
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    # Aligned CelebA is 178x218; white exactly in the central 140x140, black outside.
    img = Image.new("RGB", (178, 218), (0, 0, 0))
    img.paste((255, 255, 255), (19, 39, 159, 179))
    for i in range(1, 5):
        img.save(folder / "img_align_celeba" / f"{i:06d}.jpg", quality=95)
    partition = "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n"
    (folder / "list_eval_partition.txt").write_text(partition)
    data, info = load_image_dataset("celeba64", tmp_path)
    assert info.size == 2 and info.shape == (3, 64, 64) and info.num_classes == 0 and info.flip
    x, label = data[0]
    assert x.shape == (3, 64, 64) and label == 0
    assert x.mean() > 0.9  # the whole crop is the white square (the full image is half black)
    assert load_image_dataset("celeba64", tmp_path, "all")[1].size == 4
    x0, y = ImageStream(data, seed=0, flip=True).next_batch(3)
    assert x0.shape == (3, 3, 64, 64) and y is None


# --- ImageStream -----------------------------------------------------------------------------


def _indexed_images(n: int = 10) -> TensorImages:
    """Image i is one row [2i, 2i+1]: its index and whether it was flipped can be read back."""
    row = torch.arange(2 * n, dtype=torch.uint8).reshape(n, 1, 1, 2)
    return TensorImages(row, torch.arange(n) % 3)


def _decode(x0: torch.Tensor) -> tuple[list[int], list[bool]]:
    pixels = ((x0 + 1) * 127.5).round().long()[:, 0, 0]  # (B, 2)
    return (pixels.min(dim=1).values // 2).tolist(), (pixels[:, 0] > pixels[:, 1]).tolist()


class _PerItem(torch.utils.data.Dataset):
    """The same images seen only through __getitem__ (the imagefolder / CelebA path)."""

    def __init__(self, data: TensorImages):
        self.data, self.num_classes = data, data.num_classes

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_stream_visits_every_image_once_per_epoch():
    data = _indexed_images(10)
    stream = ImageStream(data, seed=3, flip=False)
    seen, labels = [], []
    for _ in range(10):  # 30 = three epochs, in batches of 3 that straddle the epoch ends
        x0, y = stream.next_batch(3)
        seen += _decode(x0)[0]
        labels += y.tolist()
    epochs = [seen[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert labels == [i % 3 for i in seen] and stream.epoch == 2
    assert stream.shape == (1, 1, 2) and stream.num_classes == 3


def test_stream_flips_only_when_enabled():
    data = _indexed_images(10)
    assert not any(_decode(ImageStream(data, seed=0, flip=False).next_batch(40)[0])[1])
    flips = _decode(ImageStream(data, seed=0, flip=True).next_batch(40)[0])[1]
    assert 5 < sum(flips) < 35


@pytest.mark.parametrize("per_item", [False, True], ids=["tensor", "dataset"])
def test_stream_resumes_bitwise(per_item):
    data = _PerItem(_indexed_images(7)) if per_item else _indexed_images(7)
    stream = ImageStream(data, seed=11, flip=True)
    for _ in range(4):
        stream.next_batch(5)
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [stream.next_batch(5) for _ in range(5)]
    resumed = ImageStream(data, seed=999, flip=True)
    resumed.load_state_dict(state)
    for (x0, y), (x0_r, y_r) in zip(
        expected, [resumed.next_batch(5) for _ in range(5)], strict=True
    ):
        assert torch.equal(x0, x0_r) and torch.equal(y, y_r)


def test_tensor_and_per_item_paths_agree():
    data = _indexed_images(6)
    fast, slow = ImageStream(data, 5, True), ImageStream(_PerItem(data), 5, True)
    for _ in range(3):
        (x0, y), (x0_s, y_s) = fast.next_batch(4), slow.next_batch(4)
        assert torch.equal(x0, x0_s) and torch.equal(y, y_s)


def test_stream_rejects_state_of_other_data():
    state = ImageStream(_indexed_images(5), 0, False).state_dict()
    with pytest.raises(ValueError, match="5 images"):
        ImageStream(_indexed_images(6), 0, False).load_state_dict(state)


def test_stream_from_uint8_tensors_unconditional():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x0, y = ImageStream((images, None), seed=0, flip=False).next_batch(4)
    assert y is None and x0.shape == (4, 3, 8, 8) and x0.dtype == torch.float32
