"""The k-means tokenizer that makes BEiT's visual tokens (and HuBERT's cluster ids) from the data."""

import time

import pytest
import torch

from selfsup.errors import SelfsupError
from selfsup.nn.targets import KMeansTokenizer


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def separated_clusters(num_clusters: int = 8, dim: int = 16, num_points: int = 20_000, noise: float = 0.5, seed: int = 1):
    """Gaussian blobs whose centres are ~40 noise widths apart: (vectors, true labels, true centres)."""
    g = gen(seed)
    centres = torch.randn(num_clusters, dim, generator=g) * 10
    labels = torch.randint(num_clusters, (num_points,), generator=g)
    return centres[labels] + noise * torch.randn(num_points, dim, generator=g), labels, centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_clusters(seed):
    x, labels, centres = separated_clusters()
    tokenizer = KMeansTokenizer(8, 16)
    stats = tokenizer.fit(x, gen(seed))
    ids = tokenizer.assign(x)
    assert ids.dtype == torch.int64 and ids.shape == labels.shape
    table = torch.zeros(8, 8, dtype=torch.long).index_put_((labels, ids), torch.ones_like(labels), accumulate=True)
    # Each true cluster maps to exactly one token and each token to one cluster: purity 1.0.
    assert ((table > 0).sum(dim=1) == 1).all() and ((table > 0).sum(dim=0) == 1).all(), table
    # The centroids are the clusters' means (standard error 0.5 / sqrt(2500) = 0.01 per coordinate).
    token_of = table.argmax(dim=1)  # [true cluster] -> token
    assert (tokenizer.centroids[token_of] - centres).abs().max() < 0.06
    # Mean squared distance = the noise variance per coordinate times the dimension: 0.25 * 16.
    assert abs(stats["inertia"] - 4.0) < 0.1 and stats["used"] == 8


def test_quality_close_to_full_kmeans_on_overlapping_data():
    """On overlapping blobs (no right answer) mini-batch k-means should land near full Lloyd
    k-means (scikit-learn, 3 restarts): measured 1.03x its inertia; random centroids give ~2x."""
    from sklearn.cluster import KMeans

    g = gen(0)
    centres = torch.randn(32, 8, generator=g) * 3
    x = centres[torch.randint(32, (6000,), generator=g)] + torch.randn(6000, 8, generator=g)
    tokenizer = KMeansTokenizer(16, 8)
    tokenizer.fit(x, gen(0), batch_size=512)
    ours = float((x - tokenizer.centroids[tokenizer.assign(x)]).square().sum(dim=1).mean())
    reference = KMeans(16, n_init=3, random_state=0).fit(x.numpy()).inertia_ / len(x)
    assert ours < 1.1 * reference, (ours, reference)


def test_assign_is_the_nearest_centroid_for_any_leading_shape():
    x, _, _ = separated_clusters(num_clusters=8, dim=6, num_points=3000, noise=3.0)
    tokenizer = KMeansTokenizer(24, 6)
    tokenizer.fit(x, gen(0))
    queries = torch.randn(5, 37, 6, generator=gen(9)) * 10
    ids = tokenizer.assign(queries, batch_size=16)  # several chunks, the last one partial
    assert ids.shape == (5, 37)
    brute = torch.cdist(queries.reshape(-1, 6).double(), tokenizer.centroids.double()).argmin(dim=1).reshape(5, 37)
    assert torch.equal(ids, brute)


def test_same_seed_same_codebook():
    x, _, _ = separated_clusters(num_clusters=12, dim=8, num_points=4000, noise=4.0)
    a, b, c = KMeansTokenizer(16, 8), KMeansTokenizer(16, 8), KMeansTokenizer(16, 8)
    a.fit(x, gen(7))
    b.fit(x, gen(7))
    c.fit(x, gen(8))
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)


def test_save_load_round_trip(tmp_path):
    x, _, _ = separated_clusters(num_clusters=8, dim=8, num_points=3000, noise=3.0)
    tokenizer = KMeansTokenizer(16, 8)
    tokenizer.fit(x, gen(0))
    tokenizer.save(tmp_path / "tokens.safetensors")
    loaded = KMeansTokenizer.load(tmp_path / "tokens.safetensors")
    assert (loaded.num_tokens, loaded.dim) == (16, 8) and bool(loaded.fitted)
    assert torch.equal(loaded.centroids, tokenizer.centroids)
    assert torch.equal(loaded.assign(x), tokenizer.assign(x))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the temporary file must be renamed away"


def test_load_of_a_foreign_file_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SelfsupError, match="junk.safetensors"):
        KMeansTokenizer.load(tmp_path / "junk.safetensors")


def test_bad_use_is_refused_with_a_message():
    tokenizer = KMeansTokenizer(16, 4)
    with pytest.raises(SelfsupError, match="not fitted"):
        tokenizer.assign(torch.zeros(3, 4))
    with pytest.raises(SelfsupError, match="at least as many vectors"):
        tokenizer.fit(torch.randn(10, 4), gen(0))
    with pytest.raises(SelfsupError, match=r"\[M, 4\]"):
        tokenizer.fit(torch.randn(100, 5), gen(0))
    tokenizer.fit(torch.randn(100, 4, generator=gen(0)), gen(0))
    with pytest.raises(SelfsupError, match="dimension 5"):
        tokenizer.assign(torch.zeros(3, 5))
    with pytest.raises(SelfsupError, match="at least 2 tokens"):
        KMeansTokenizer(1, 4)


def test_fewer_distinct_points_than_tokens():
    """Duplicated data (flat image patches) must not give NaN centroids or merge distinct points."""
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    x = points.repeat(50, 1)  # 200 vectors, 4 distinct
    tokenizer = KMeansTokenizer(8, 2)
    stats = tokenizer.fit(x, gen(0), batch_size=64)
    assert torch.isfinite(tokenizer.centroids).all()
    assert len(set(tokenizer.assign(points).tolist())) == 4
    assert stats["inertia"] < 1e-6


def test_fit_is_fast_enough_for_a_run():
    """pretrain fits BEiT's tokens before step 0 (8192 images x 64 patches = 524k vectors of 48 at
    32 px): measured 5-10 s for 200k x 48 into 512 tokens on one loaded thread; time is linear in
    the vectors (5 passes + one Lloyd step), so a 1M-vector fit takes ~5x that."""
    x = torch.randn(200_000, 48, generator=gen(0))
    tokenizer = KMeansTokenizer(512, 48)
    start = time.perf_counter()
    stats = tokenizer.fit(x, gen(0))
    assert time.perf_counter() - start < 15.0
    assert stats["used"] == 512
