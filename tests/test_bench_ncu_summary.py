"""benchmarks.ncu_summary on a synthetic Nsight Compute raw CSV (the real one comes from a GPU)."""

import pytest

from benchmarks.ncu_summary import main, markdown, read_raw_csv, summarise

RAW = '''==PROF== Connected to process 1234
"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed","dram__bytes.sum","lts__t_sector_hit_rate.pct","l1tex__t_sector_hit_rate.pct","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","sm__warps_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_not_issued_per_issue_active.ratio"
"","","","usecond","%","Mbyte","%","%","%","%","ratio","ratio","ratio"
"0","1234","_fwd_kernel","100","80","200","50","70","5","60","3.5","0.5","9"
"1","1234","_fwd_kernel","120","82","200","52","72","5","62","4.5","0.5","9"
"2","1234","_merge_kernel","10","20","1,000","90","10","0","30","1.0","2.0","9"
'''


def test_summarise_averages_launches_and_ranks_stalls():
    header, units, rows = read_raw_csv(RAW)
    s = summarise(header, units, rows)
    fwd = s["_fwd_kernel"]
    assert fwd["launches"] == 2
    assert fwd["time µs"] == pytest.approx(110)
    assert fwd["DRAM %peak"] == pytest.approx(81)
    assert fwd["L2 hit"] == pytest.approx(51) and fwd["L1 hit"] == pytest.approx(71)
    assert fwd["tensor pipe"] == pytest.approx(5) and fwd["occupancy"] == pytest.approx(61)
    assert [r for r, _ in fwd["stalls"]] == ["long_scoreboard", "barrier"]  # "not_issued" is no stall reason
    assert s["_merge_kernel"]["DRAM MB"] == pytest.approx(1000)  # thousands separators
    md = markdown(s)
    assert md.index("_fwd_kernel") < md.index("_merge_kernel")  # slowest first


def test_main_rejects_a_file_that_is_not_a_raw_page(tmp_path, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error:")
