"""Writes the Azure ML v1 run configurations under tests/data/runconfigs/ with
the real azureml-core, the way users build and save them. The suite only
reads the saved files; it does not need azureml-core.

    python3 -m venv /tmp/v1 && /tmp/v1/bin/pip install azureml-core==1.61.0.post4
    /tmp/v1/bin/python tests/data/make_runconfigs.py tests/data/runconfigs

(and again with azureml-core==1.48.0 and 1.35.0, the oldest that installs
on Python 3.11, each in a venv of its own). Each version gets a
directory named after it, holding:

    train.runconfig          save(path=<dir>/train.runconfig): a file of its own
    project/.azureml/score   save(path=<dir>/project, name="score"): in a
                             project's .azureml directory (the library adds
                             conda_dependencies.yml)
    project/.azureml/train   the same, with separate_environment_yaml=True:
                             `environment: .azureml/environment.yml`
"""

import os
import sys

import azureml.core
from azureml.core.runconfig import DataReferenceConfiguration, RunConfiguration


def train() -> RunConfiguration:
    """Inputs mounted and downloaded, outputs uploaded, variables set both
    ways azureml-core offers."""
    rc = RunConfiguration()
    rc.script = "train.py"
    rc.arguments = ["--data-folder", "$AZUREML_DATAREFERENCE_input_data", "--epochs", 3,
                    "--output", "$AZUREML_DATAREFERENCE_results"]
    rc.data_references = {
        "input_data": DataReferenceConfiguration(datastore_name="workspaceblobstore", mode="mount",
                                                 path_on_datastore="datasets/mnist"),
        "pretrained": DataReferenceConfiguration(datastore_name="workspaceblobstore", mode="download",
                                                 path_on_datastore="models/resnet50",
                                                 path_on_compute="pretrained"),
        "results": DataReferenceConfiguration(datastore_name="workspaceblobstore", mode="upload",
                                              path_on_datastore="runs/outputs", path_on_compute="outputs",
                                              overwrite=True),
    }
    rc.environment.environment_variables = {"DATA_FORMAT": "png"}
    if hasattr(RunConfiguration, "environment_variables"):  # the run's own variables (1.35 saves them empty)
        rc.environment_variables = {"EPOCHS": "3"}
    rc.environment.python.user_managed_dependencies = True
    rc.environment.python.interpreter_path = "/usr/bin/python3"
    return rc


def score() -> RunConfiguration:
    """One download, defaults everywhere else."""
    rc = RunConfiguration()
    rc.script = "score.py"
    rc.data_references = {
        "model": DataReferenceConfiguration(datastore_name="workspaceblobstore", mode="download",
                                            path_on_datastore="models/best"),
    }
    return rc


def main(out: str) -> None:
    root = os.path.join(out, azureml.core.VERSION)
    project = os.path.join(root, "project")
    os.makedirs(os.path.join(project, ".azureml"), exist_ok=True)
    target = os.path.join(root, "train.runconfig")
    open(target, "w").close()  # 1.61 refuses to save to a file that does not exist yet
    train().save(path=target)
    score().save(path=project, name="score")
    train().save(path=project, name="train", separate_environment_yaml=True)
    for base, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            print(os.path.relpath(os.path.join(base, name), out))


if __name__ == "__main__":
    main(sys.argv[1])
