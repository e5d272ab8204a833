"""Opening real slides through TIAToolbox: vendors, levels, mpp precedence and clear errors."""
import pandas as pd
import pytest

from conftest import ROOT
from wsi_study.core import SlideError
from wsi_study.slides import open_slide, slide_info, slide_mpp, slide_table, thumbnail

NDPI = ROOT / "data" / "wsi" / "hamamatsu_fluorescence_DAPI.ndpi"  # ships with the repository (data/README.md)


def test_cmu_svs(shared):
    """Aperio SVS with mpp in its metadata."""
    info = slide_info(shared / "cmu_small_region.svs")
    assert (info["width"], info["height"], info["levels"]) == (2220, 2967, 1)
    assert info["mpp"] == pytest.approx(0.499) and info["mpp_source"] == "metadata" and info["vendor"] == "aperio"


def test_ndpi_pyramid():
    """A 7-level Hamamatsu pyramid."""
    info = slide_info(NDPI)
    assert info["levels"] == 7 and info["mpp"] == pytest.approx(0.228, abs=1e-3) and info["vendor"] == "hamamatsu"


def test_tcga_has_no_mpp(shared):
    """Never a guessed mpp: the TCGA slide needs a manifest mpp, which then wins."""
    with pytest.raises(SlideError, match="has no mpp in its metadata; add an mpp column"):
        slide_info(shared / "tcga-cr-7395-01a-01-ts1.svs", slide_id="tcga")
    info = slide_info(shared / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5)
    assert info["mpp"] == 0.5 and info["mpp_source"] == "manifest" and info["levels"] == 2


def test_manifest_mpp_beats_metadata(shared):
    reader = open_slide(shared / "cmu_small_region.svs", mpp=0.25)
    assert slide_mpp(reader, 0.25) == (0.25, "manifest")


def test_dicom_cannot_be_opened(shared):
    """The sparse-tiled DICOM without an ImageType opens with no backend here: a SlideError naming file and reason,
    and what is wrong with the file."""
    path = shared / "pathml_small_dicom_sm.dcm"
    with pytest.raises(SlideError) as e:
        open_slide(path)
    assert str(path) in str(e.value) and "cannot be opened by any slide reader" in str(e.value)
    assert "not conformant: it lacks the required ImageType" in str(e.value)


def test_dicom_wsi_opens(shared):
    """A DICOM WSI pair opens through TIAToolbox's DICOM reader."""
    info = slide_info(shared / "openslide_fixtures" / "boxes_0.dcm")
    assert info["reader"] == "DICOMWSIReader" and info["mpp"] == pytest.approx(0.499)


def test_not_a_slide(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("hello")
    with pytest.raises(SlideError, match="cannot be opened"):
        open_slide(p)


def test_slide_table_goes_on(shared):
    """A batch table records a failing slide and keeps the others."""
    m = pd.DataFrame({"slide_id": ["ok", "bad"], "patient_id": ["p1", "p2"],
                      "path": [shared / "cmu_small_region.svs", shared / "pathml_small_dicom_sm.dcm"]})
    t = slide_table(m, progress=False)
    assert t.error[0] == "" and "cannot be opened" in t.error[1] and t.width[0] == 2220


def test_thumbnail():
    th = thumbnail(open_slide(NDPI), 300)
    assert th.ndim == 3 and th.shape[2] == 3 and abs(max(th.shape[:2]) - 300) <= 2
