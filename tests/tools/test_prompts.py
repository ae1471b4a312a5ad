import pytest

from dlexport.tools.prompts import LICENSES, prose_prompts, prose_texts

pytestmark = pytest.mark.skipif(not LICENSES.is_dir(), reason="no /usr/share/common-licenses on this system")


def test_prompts_are_exact_length_and_fixed():
    a = prose_prompts(4, 32, vocab_size=512)
    b = prose_prompts(4, 32, vocab_size=512)
    assert a == b
    assert all(len(p["ids"]) == 32 and max(p["ids"]) < 512 for p in a)
    assert len({tuple(p["ids"]) for p in a}) == 4


def test_prose_comes_from_the_license_files():
    name, text = prose_texts()[0]
    assert (LICENSES / name).is_file() and len(text.split()) > 100


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prose found"):
        prose_prompts(1, 8, vocab_size=10, folder=tmp_path)
