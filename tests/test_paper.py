from pathlib import Path

import pytest

from lposs.evaluation.paper import paper_reference

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_paper_reference_spot_values():
    assert paper_reference("voc", "lposs+") == {"miou": 62.4, "boundary_iou": 51.2}
    assert paper_reference("cityscapes", "Oracle") == {"miou": 73.6, "boundary_iou": 66.4}
    assert paper_reference("context59", "maskclip") == {"miou": 25.5, "boundary_iou": 12.0}
    assert paper_reference("ade20k", "lposs") == {"miou": 21.8, "boundary_iou": 14.9}
    assert paper_reference("ade20k", "proxyclip") == {"miou": 19.4, "boundary_iou": None}
    assert paper_reference("average", "lposs+") == {"miou": 42.1, "boundary_iou": 32.1}
    assert paper_reference("voc", "segformer") is None
    assert paper_reference("kitti", "lposs") is None


def test_paper_reference_matches_the_shared_tables():
    tables = SHARED / "benchmarks" / "paper_tables.md"
    if not tables.is_file():
        pytest.skip("shared paper tables not present")
    columns = ["voc", "coco_object", "context", "context59", "coco_stuff", "voc20", "ade20k",
               "cityscapes", "average"]  # fmt: skip
    rows = {"Oracle (patch-level res.)": "oracle", "MaskCLIP": "maskclip", "LPOSS": "lposs",
            "LPOSS+": "lposs+"}  # fmt: skip
    text = tables.read_text()
    sections = {"miou": text.split("## Table 1")[1].split("## Table 2")[0],
                "boundary_iou": text.split("## Table 2")[1].split("## Table 3")[0]}  # fmt: skip
    checked = 0
    for key, section in sections.items():
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] in rows:
                for dataset, value in zip(columns, cells[1:], strict=True):
                    assert paper_reference(dataset, rows[cells[0]])[key] == float(value)
                    checked += 1
    assert checked == 2 * 4 * 9
