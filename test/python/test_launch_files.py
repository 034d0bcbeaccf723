"""What can be checked of the launch files without `ros2 launch`: every executable, parameter file and
included launch file they name exists in the install tree, every argument is described, included
files get only arguments they declare, and the issue's argument names are there."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

LAUNCH = sorted((REPO / "launch").glob("*.launch.py"))
INSTALL = REPO / "install"
# The arguments users of a robot stack expect (names are interface).
STACK_ARGS = {"model_dir", "namespace", "cmd_vel_topic", "image_topic", "use_sim_time", "params_file", "dtype"}


def parse(path: Path):
    """(declared args {name: description}, executables, config files, includes [(file, arg names)])."""
    tree = ast.parse(path.read_text())
    args, exes, configs, includes = {}, set(), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ARGS" for t in node.targets):
            for k, v in zip(node.value.keys, node.value.values):
                args[k.value] = v.elts[1].value
        if isinstance(node, ast.Call):
            if getattr(node.func, "id", "") == "DeclareLaunchArgument" and isinstance(node.args[0], ast.Constant):
                desc = [kw.value for kw in node.keywords if kw.arg == "description"]
                args[node.args[0].value] = desc[0].value if desc and isinstance(desc[0], ast.Constant) else ""
            for kw in node.keywords:
                if kw.arg == "executable":
                    exes.add(kw.value.value)
            consts = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if consts[:1] == ["config"] and len(consts) == 2:
                configs.add(consts[1])
            if getattr(node.func, "id", "") == "include":
                includes.append((consts[0], [kw.arg for kw in node.keywords if kw.arg]))
    return args, exes, configs, includes


@pytest.mark.parametrize("path", LAUNCH, ids=[p.name for p in LAUNCH])
def test_launch_file_names_only_what_exists(path):
    args, exes, configs, includes = parse(path)
    assert args, f"{path.name} declares no arguments"
    assert all(desc.strip() for desc in args.values()), "every argument is described (--show-args)"
    for exe in exes:
        assert (INSTALL / "lib" / "mobile_vla" / exe).exists(), f"{path.name}: executable {exe} not installed"
    for cfg in configs:
        assert (INSTALL / "share" / "mobile_vla" / "config" / cfg).exists(), f"{path.name}: {cfg} not installed"
    for name, passed in includes:
        assert (INSTALL / "share" / "mobile_vla" / "launch" / name).exists(), f"{name} not installed"
        declared = parse(REPO / "launch" / name)[0]
        assert set(passed) <= set(declared), f"{path.name} passes {name} undeclared arguments"


@pytest.mark.parametrize("name", ["policy.launch.py", "bringup.launch.py"])
def test_stack_arguments(name):
    assert STACK_ARGS <= set(parse(REPO / "launch" / name)[0])


def test_train_launch_arguments():
    assert {"model_dir", "namespace", "cmd_vel_topic", "image_topic", "use_sim_time", "params_file"} <= set(
        parse(REPO / "launch" / "train.launch.py")[0]
    )
