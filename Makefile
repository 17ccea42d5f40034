# robustlab — `make run` (main job) and `make test` (whole suite) set everything up on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRACKING_URI := sqlite:///$(CURDIR)/tracking/mlflow.db
PORT ?= 5000
# Data: $ROBUSTLAB_DATA_DIR when set, else ../shared/data when present, else Keras' cache/download.
ROBUSTLAB_DATA_DIR ?= $(if $(wildcard ../shared/data/mnist.npz),$(abspath ../shared/data),)
export ROBUSTLAB_DATA_DIR
export MLFLOW_TRACKING_URI ?= $(TRACKING_URI)
# Short default budget for the main job; override e.g. RUN_ARGS="-P epochs=10".
RUN_ENTRY ?= joint
RUN_ARGS ?= -P epochs=1
PYTEST_ARGS ?=
# The thesis reproduction experiment (make experiment): budget smoke | default | full
BUDGET ?= default
SEEDS ?= 3

.PHONY: setup test run experiment champion champion-carry champion-ship champion-baselines server ui lint bench clean services services-stop tune dashboard

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The suite in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (its
# module fixtures, e.g. the PostgreSQL + MLflow services, start once): most tests wait on
# subprocesses and servers, so one process keeps 2 cores less than half busy.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

run: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  mlflow run . -e $(RUN_ENTRY) --env-manager local --experiment-name robustlab $(RUN_ARGS)

experiment: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  mlflow run . -e experiment --env-manager local --experiment-name robustlab \
	    -P budget=$(BUDGET) -P seeds=$(SEEDS)

# The champion (issue 27): TRADES' MNIST recipe on TRADES' SmallCNN (small_cnn): 100 epochs of
# SGD (lr 0.01, momentum 0.9, x0.1 from epoch 75, x0.01 from epoch 90), batch 128, beta 6, the
# inner maximisation 40 steps of 0.01 in the eps 0.3 ball, float32; the epoch kept is the one
# with the best validation PGD accuracy (validation data only). Resumable: after an interruption
# the same `make champion` continues the unfinished `champion` run from its last checkpoint; it
# refuses (one line, exit 2) other arguments, and a finished run.
CHAMPION_ARGS := --model small_cnn --method trades --trades-beta 6 --eps 0.3 --attack-steps 40 \
  --step-size 0.01 --eps-warmup 0 --optimizer sgd --learning-rate 0.01 --lr-schedule step \
  --batch-size 128 --epochs 100 --patience 0 --precision float32 --seed 0 \
  --run-name champion --auto-resume

# The unfinished champion carried between machines (robustlab carry): `make champion-carry`
# writes its bundle (params, metrics, artifacts, last epoch checkpoint) here, to be committed;
# `make champion` on another machine or a fresh clone imports it first, then resumes it.
CHAMPION_CARRY := pretrained/champion-in-training

champion: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  { test ! -f $(CHAMPION_CARRY)/run.json || robustlab carry import $(CHAMPION_CARRY); } && \
	  robustlab perturbation $(CHAMPION_ARGS)

champion-carry: setup
	source $(BIN)/activate && robustlab carry export --run-name champion --out $(CHAMPION_CARRY)

# Once the champion FINISHED: register it (robustlab-mnist; `champion` moves to it unless a better
# model holds it) with the evaluation issue 27 reports, on the test set minus its exclusions:
# PGD-40, PGD-100 x 5 restarts, and on 1,000 images AutoAttack (APGD-CE, APGD-DLR, Square) with
# APGD-T; then write it with that card to pretrained/$(CHAMPION_NAME), and drop the carried state.
# Refused in one line while the run has not finished.
CHAMPION_NAME := small-cnn-trades
CHAMPION_EVAL := --autoattack-size 1000 --extra-attacks apgd_t --pgd-steps 100 --pgd-restarts 5
champion-ship: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  robustlab register --run-name champion $(CHAMPION_EVAL) && \
	  robustlab register --run-name champion --export pretrained/$(CHAMPION_NAME) && \
	  rm -rf $(CHAMPION_CARRY)

# The two models the champion is compared with, trained (resumable) and registered under their own
# names with the champion's evaluation on the same test images: the 6-epoch `perturbation` default
# (PGD-7, madry_cnn) and the same with TRADES-7.
champion-baselines: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  robustlab perturbation --run-name baseline-pgd --auto-resume && \
	  robustlab register --run-name baseline-pgd --name baseline-pgd $(CHAMPION_EVAL) && \
	  robustlab perturbation --method trades --run-name baseline-trades7 --auto-resume && \
	  robustlab register --run-name baseline-trades7 --name baseline-trades7 $(CHAMPION_EVAL)

# Optuna tuning of the joint mixture (make tune TUNE_ARGS="-P budget=smoke -P n_trials=3")
OPTUNA_STORAGE ?= $(or $(ROBUSTLAB_OPTUNA_STORAGE),sqlite:///$(CURDIR)/tracking/optuna.db)
DASHBOARD_PORT ?= 8080
TUNE_ARGS ?=

tune: setup
	source $(BIN)/activate && robustlab tracking-init && \
	  mlflow run . -e tune --env-manager local --experiment-name robustlab $(TUNE_ARGS)

# the storage URL (it may carry a password) reaches the dashboard through its environment only
dashboard: export ROBUSTLAB_OPTUNA_STORAGE := $(OPTUNA_STORAGE)
dashboard: setup
	@mkdir -p tracking && $(BIN)/robustlab dashboard --port $(DASHBOARD_PORT)

server: setup
	@echo "runs: http://127.0.0.1:$(PORT)/#/experiments?workflowType=machine_learning"
	source $(BIN)/activate && MLFLOW_TRACKING_URI=$(TRACKING_URI) robustlab tracking-init && \
	  mlflow server --backend-store-uri $(TRACKING_URI) \
	    --artifacts-destination $(CURDIR)/tracking/artifacts --host 127.0.0.1 --port $(PORT)

# One PostgreSQL (MLflow + Optuna databases) and one MLflow server on it, for many workers;
# writes tracking/services.env (see README, "Scaling out"). Idempotent.
services: setup
	$(BIN)/robustlab services start

services-stop: setup
	$(BIN)/robustlab services stop

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT)

lint: setup
	$(BIN)/ruff check robustlab tests bench
	$(BIN)/ruff format --check robustlab tests bench

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) tracking/mlflow.db tracking/artifacts .pytest_cache
