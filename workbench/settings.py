"""Workbench settings: one module, every value from the environment, checked.

Embedded defaults run the whole stack on one machine (SQLite under var/, a broker that
needs no server, artifacts on disk). ``WORKBENCH_MODE=production`` refuses the development
secret key and switches on the deployment checks, so ``manage.py check --deploy`` is clean.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from workbench.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
    url_with_password,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("WORKBENCH_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

MODE = env_choice("WORKBENCH_MODE", "development", ("development", "production"))
PRODUCTION = MODE == "production"

DEV_SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105
SECRET_KEY = env_str("SECRET_KEY", DEV_SECRET_KEY)
if PRODUCTION and (SECRET_KEY == DEV_SECRET_KEY or len(SECRET_KEY) < 50):
    raise ImproperlyConfigured(
        "WORKBENCH_MODE=production needs SECRET_KEY (or SECRET_KEY_FILE): at least 50 "
        "random characters, not the development default"
    )

DEBUG = env_bool("DEBUG", not PRODUCTION)
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("DEBUG must be false when WORKBENCH_MODE=production")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["*"])
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("WORKBENCH_MODE=production needs ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "apps.core",
    "apps.audit",
    "apps.tenants",
    "apps.datasets",
    "apps.training",
    "apps.registry",
    "apps.evaluation",
    "apps.promotions",
    "apps.deployments",
    "apps.campaigns",
    "apps.batch",
    "oauth2_provider",
    "apps.notebooks",
    "axes",
    "csp",
]

# The test suite adds a small app whose rows reference dataset versions the way training
# runs will, to prove a referenced version cannot be deleted.
TESTING = env_bool("WORKBENCH_TESTING", "pytest" in sys.modules)
if TESTING:
    INSTALLED_APPS.append("tests.refapp")
    # Test users are made by the hundred; a slow password hash would dominate the suite.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

MIDDLEWARE = [
    "apps.core.middleware.RequestIdMiddleware",
    "apps.core.middleware.MetricsMiddleware",
    # Inside the request id, outside everything that answers errors: Django's own 404s and
    # 500s under /api/ leave in the API's JSON error envelope.
    "apps.core.middleware.ApiErrorEnvelopeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "workbench.urls"
WSGI_APPLICATION = "workbench.wsgi.application"
ASGI_APPLICATION = "workbench.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "apps.tenants.context_processors.tenant_switcher",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'workbench.sqlite3'}")
# Live-server threads in tests must not keep connections open past their request, or
# the test database cannot be dropped at the end of the run.
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0 if TESTING else 60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat share the file: wait for locks instead of failing at once.
    # Connections persist like Postgres ones (conn_max_age above): opening one per request
    # cost a REST predict ~6 ms (SQLite registers Django's functions on every connect).
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "transaction_mode": "IMMEDIATE"}
    # A file, not memory, so worker processes started by tests see the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-workbench.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# OWASP ASVS 2.1.1: passwords of at least 12 characters.
PASSWORD_MIN_LENGTH = env_int("PASSWORD_MIN_LENGTH", 12, minimum=8)
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": PASSWORD_MIN_LENGTH},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Logins (dashboard, admin, the hub's OAuth sign-in) go through django-axes: after
# LOGIN_FAILURE_LIMIT failures for one username from one address, that pair is locked out
# for LOGIN_LOCKOUT_MINUTES (counted from the last failure; trying again restarts it).
AUTHENTICATION_BACKENDS = [
    "apps.tenants.lockout.LockoutBackend",  # django-axes' AxesStandaloneBackend
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1)
# Proxies in front of the web service that append to X-Forwarded-For (0: the client's
# address is REMOTE_ADDR). Counting from the right, so a client cannot forge its address.
LOGIN_PROXY_COUNT = env_int("LOGIN_PROXY_COUNT", 0, minimum=0)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_LOCKOUT_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "apps.tenants.lockout.client_ip"
AXES_LOCKOUT_CALLABLE = "apps.tenants.lockout.locked_out_response"
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# gunicorn serves the dashboard's static files through WhiteNoise (collectstatic in the
# image); in development WhiteNoise finds them in place, no collectstatic needed.
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
WHITENOISE_USE_FINDERS = not PRODUCTION

# --- security headers and cookies ------------------------------------------------------
# HTTPS: the site is served over TLS (always in production): cookies are Secure, HSTS on.
HTTPS = env_bool("WORKBENCH_HTTPS", PRODUCTION)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", PRODUCTION)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if PRODUCTION else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# --- uploads and artifacts ------------------------------------------------------------
ARTIFACT_STORE = env_str("ARTIFACT_STORE", f"file://{VAR_DIR / 'artifacts'}")
AWS_ENDPOINT_URL = env_str("AWS_ENDPOINT_URL", "") or None
UPLOAD_TMP_DIR = Path(env_str("UPLOAD_TMP_DIR", str(VAR_DIR / "uploads")))
UPLOAD_TMP_DIR.mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_TEMP_DIR = str(UPLOAD_TMP_DIR)
FILE_UPLOAD_HANDLERS = ["apps.core.uploads.HashingUploadHandler"]
DATASET_MAX_UPLOAD_BYTES = env_int("DATASET_MAX_UPLOAD_BYTES", 2 * 1024**3, minimum=1)
DATASET_MAX_LINE_BYTES = env_int("DATASET_MAX_LINE_BYTES", 64 * 1024, minimum=16)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# --- batch predictions ----------------------------------------------------------------
# Rows scored per chunk: a chunk is the unit a killed worker's successor redoes at most.
BATCH_CHUNK_ROWS = env_int("BATCH_CHUNK_ROWS", 500, minimum=1)
# (How many run at once: the training dispatcher's budget and each tenant's limit.)
# A running job whose worker stopped renewing its lease this long is resumed elsewhere;
# after BATCH_MAX_ATTEMPTS such losses it fails.
BATCH_HEARTBEAT_TIMEOUT_SECONDS = env_int("BATCH_HEARTBEAT_TIMEOUT_SECONDS", 30, minimum=5)
BATCH_MAX_ATTEMPTS = env_int("BATCH_MAX_ATTEMPTS", 3, minimum=1)

# --- model health ---------------------------------------------------------------------
# The cross-tenant model health report is served from its last computation while younger
# than this; an older one is recomputed in the background (beat sweeps every minute).
MODEL_HEALTH_MAX_AGE_S = env_int("MODEL_HEALTH_MAX_AGE_S", 300, minimum=1)

# --- training -------------------------------------------------------------------------
TRAINING_MAX_CONCURRENT_RUNS_PER_TENANT = env_int(
    "TRAINING_MAX_CONCURRENT_RUNS_PER_TENANT", 2, minimum=1
)
# The training budget every tenant and campaign shares: runs training (or sent to the
# queue) at once across all tenants — set it to the training slots the workers have (GPUs).
# The dispatcher fills it by weighted fair share (apps.training.fairshare): each campaign
# is one queue with its weight, each tenant's one-off runs another of weight 1.
TRAINING_MAX_CONCURRENT_RUNS = env_int("TRAINING_MAX_CONCURRENT_RUNS", 8, minimum=1)
TRAINING_MIN_ROWS_PER_LABEL = env_int("TRAINING_MIN_ROWS_PER_LABEL", 5, minimum=1)
TRAINING_HEARTBEAT_TIMEOUT_SECONDS = env_int("TRAINING_HEARTBEAT_TIMEOUT_SECONDS", 30, minimum=5)
# A training worker whose heartbeat fails this many times in a row (database unreachable)
# stops training and leaves the run to be re-queued; retries back off 1, 2, 4, 5, 5 s.
TRAINING_HEARTBEAT_MAX_FAILURES = env_int("TRAINING_HEARTBEAT_MAX_FAILURES", 5, minimum=1)
# A run dispatched but claimed by no worker within this bound, while the training queue is
# empty, was lost by the broker: it is sent again, and failed after TRAINING_MAX_REDISPATCHES.
TRAINING_DISPATCH_TIMEOUT_SECONDS = env_int("TRAINING_DISPATCH_TIMEOUT_SECONDS", 300, minimum=5)
TRAINING_MAX_REDISPATCHES = env_int("TRAINING_MAX_REDISPATCHES", 3, minimum=0)
TRAINING_MAX_SWEEP_POINTS = env_int("TRAINING_MAX_SWEEP_POINTS", 50, minimum=1)
TRAINING_SOFT_TIME_LIMIT = env_int("TRAINING_SOFT_TIME_LIMIT", 6 * 3600, minimum=60)
# The Celery queue training runs go to: GPU hosts consume it (`-Q gpu`), one task per GPU.
TRAINING_QUEUE = env_str("TRAINING_QUEUE", "gpu")
TRAINING_WORK_DIR = Path(env_str("TRAINING_WORK_DIR", str(VAR_DIR / "training")))
EVALUATION_SAMPLE_ROWS = env_int("EVALUATION_SAMPLE_ROWS", 500, minimum=1)
# A running evaluation whose worker stopped heartbeating this long is re-queued; after
# EVALUATION_MAX_ATTEMPTS attempts lost that way it fails (and so does its promotion).
EVALUATION_HEARTBEAT_TIMEOUT_SECONDS = env_int(
    "EVALUATION_HEARTBEAT_TIMEOUT_SECONDS", 30, minimum=5
)
EVALUATION_MAX_ATTEMPTS = env_int("EVALUATION_MAX_ATTEMPTS", 3, minimum=1)
MLFLOW_TRACKING_URI = env_str("MLFLOW_TRACKING_URI", f"sqlite:///{VAR_DIR / 'mlflow.sqlite3'}")
MLFLOW_ARTIFACT_ROOT = env_str("MLFLOW_ARTIFACT_ROOT", f"file://{VAR_DIR / 'mlartifacts'}")
MLFLOW_UI_URL = env_str("MLFLOW_UI_URL", "")
# A tracking server behind MLflow's basic-auth app (compose.yaml): MLflow's client reads
# these two variables at each request, so they are put back into the environment, the
# password read from MLFLOW_TRACKING_PASSWORD_FILE where it is a secret file.
MLFLOW_TRACKING_USERNAME = env_str("MLFLOW_TRACKING_USERNAME", "")
MLFLOW_TRACKING_PASSWORD = env_str("MLFLOW_TRACKING_PASSWORD", "")
if bool(MLFLOW_TRACKING_USERNAME) != bool(MLFLOW_TRACKING_PASSWORD):
    raise ImproperlyConfigured(
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or _FILE) go together: "
        "give both or neither"
    )
if MLFLOW_TRACKING_PASSWORD:
    os.environ["MLFLOW_TRACKING_USERNAME"] = MLFLOW_TRACKING_USERNAME
    os.environ["MLFLOW_TRACKING_PASSWORD"] = MLFLOW_TRACKING_PASSWORD
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# --- serving fleet --------------------------------------------------------------------
# "ray": Ray Serve, on the cluster at RAY_ADDRESS, or (blank) a local Ray the first
# deployment starts in the background under SERVING_LOCAL_DIR. "sagemaker": SageMaker
# multi-model endpoints (the SAGEMAKER_* settings).
SERVING_BACKEND = env_choice("SERVING_BACKEND", "ray", ("ray", "sagemaker"))
RAY_ADDRESS = env_str("RAY_ADDRESS", "")
RAY_NAMESPACE = env_str("RAY_NAMESPACE", "workbench")
SERVING_LOCAL_DIR = Path(env_str("SERVING_LOCAL_DIR", str(VAR_DIR / "ray")))
# Capacity of a pool when it is first used (then edited per pool).
SERVING_REPLICA_MEMORY_BYTES = env_int("SERVING_REPLICA_MEMORY_BYTES", 512 * 1024**2, minimum=1)
SERVING_MAX_SETS = env_int("SERVING_MAX_SETS", 4, minimum=1)
SERVING_TAIL_MEMORY_BYTES = env_int("SERVING_TAIL_MEMORY_BYTES", 256 * 1024**2, minimum=1)
SERVING_MIN_REPLICAS = env_int("SERVING_MIN_REPLICAS", 1, minimum=1)
SERVING_MAX_REPLICAS = env_int("SERVING_MAX_REPLICAS", 2, minimum=1)
# SageMaker multi-model endpoints (SERVING_BACKEND=sagemaker): one endpoint per model kind,
# named <SAGEMAKER_ENDPOINT_PREFIX>-<kind>, its models under s3://<bucket>/<prefix>/<kind>/.
SAGEMAKER_OPTIONS = {
    "region": env_str("SAGEMAKER_REGION", "us-east-1"),
    "bucket": env_str("SAGEMAKER_BUCKET", ""),
    "prefix": env_str("SAGEMAKER_PREFIX", "serving"),
    "role_arn": env_str("SAGEMAKER_ROLE_ARN", ""),
    "image_uri": env_str("SAGEMAKER_IMAGE_URI", ""),
    "instance_type": env_str("SAGEMAKER_INSTANCE_TYPE", "ml.m5.large"),
    "endpoint_prefix": env_str("SAGEMAKER_ENDPOINT_PREFIX", "workbench"),
    "endpoint_url": env_str("SAGEMAKER_ENDPOINT_URL", "") or None,
    # The workbench's own artifact store (e.g. MinIO) may not be AWS's S3.
    "artifact_endpoint_url": AWS_ENDPOINT_URL,
    "predict_timeout_s": env_int("SAGEMAKER_PREDICT_TIMEOUT_SECONDS", 120, minimum=1),
}
if SERVING_BACKEND == "sagemaker":
    _missing = [
        f"SAGEMAKER_{k.upper()}"
        for k in ("bucket", "role_arn", "image_uri")
        if not SAGEMAKER_OPTIONS[k]
    ]
    if _missing:
        raise ImproperlyConfigured(f"SERVING_BACKEND=sagemaker needs {', '.join(_missing)}")
DEPLOYMENT_WARMUP_SAMPLES = env_int("DEPLOYMENT_WARMUP_SAMPLES", 16, minimum=1)
# A load attempt without the model loaded after this long is retried (the pool applied
# again); after DEPLOYMENT_LOAD_ATTEMPTS attempts the deployment fails, naming why.
DEPLOYMENT_LOAD_TIMEOUT_SECONDS = env_int("DEPLOYMENT_LOAD_TIMEOUT_SECONDS", 300, minimum=1)
DEPLOYMENT_LOAD_ATTEMPTS = env_int("DEPLOYMENT_LOAD_ATTEMPTS", 3, minimum=1)
DEPLOYMENT_REWARM_SECONDS = env_int("DEPLOYMENT_REWARM_SECONDS", 3600, minimum=10)
# The fleet controller (manage.py fleet_controller): a full pass this often, and at once
# on a change; its lease lasts FLEET_LEASE_SECONDS without renewal, then another takes over.
FLEET_RECONCILE_SECONDS = env_float("FLEET_RECONCILE_SECONDS", 5.0, minimum=0.1)
FLEET_LEASE_SECONDS = env_int("FLEET_LEASE_SECONDS", 15, minimum=2)
# Web and worker processes re-read the published routing table this often.
FLEET_ROUTES_TTL_SECONDS = env_float("FLEET_ROUTES_TTL_SECONDS", 1.0, minimum=0.0)
# A predict that no replica answers within this long (connecting) is a 503.
PREDICT_CONNECT_TIMEOUT_SECONDS = env_float("PREDICT_CONNECT_TIMEOUT_SECONDS", 1.0, minimum=0.01)
PREDICT_TIMEOUT_SECONDS = env_float("PREDICT_TIMEOUT_SECONDS", 30.0, minimum=0.1)
# A replica restarting this many times within an hour raises an alert.
FLEET_RESTART_ALERT_COUNT = env_int("FLEET_RESTART_ALERT_COUNT", 3, minimum=1)
PREDICT_MAX_INPUTS = env_int("PREDICT_MAX_INPUTS", 64, minimum=1)
PREDICT_MAX_INPUT_CHARS = env_int("PREDICT_MAX_INPUT_CHARS", 2000, minimum=1)

# --- notebooks (JupyterHub) -----------------------------------------------------------
# Where the workbench calls JupyterHub's REST API, and where users' browsers open it.
JUPYTERHUB_URL = env_str("JUPYTERHUB_URL", "http://127.0.0.1:8001").rstrip("/")
JUPYTERHUB_PUBLIC_URL = env_str("JUPYTERHUB_PUBLIC_URL", JUPYTERHUB_URL).rstrip("/")
# The workbench's token as a JupyterHub service (the hub reads the same value); empty:
# notebooks are off and starting one answers 503.
JUPYTERHUB_API_TOKEN = env_str("JUPYTERHUB_API_TOKEN", "")
# Hex, 32 bytes or more; empty: the hub keeps its own in a file next to its database.
JUPYTERHUB_COOKIE_SECRET = env_str("JUPYTERHUB_COOKIE_SECRET", "")
try:
    _cookie_secret_bytes = len(bytes.fromhex(JUPYTERHUB_COOKIE_SECRET))
except ValueError:
    _cookie_secret_bytes = -1
if JUPYTERHUB_COOKIE_SECRET and _cookie_secret_bytes < 32:
    raise ImproperlyConfigured("JUPYTERHUB_COOKIE_SECRET must be 32 or more bytes, hex-encoded")
# The hub signs users in through the workbench (OAuth 2): its client id and secret.
JUPYTERHUB_OAUTH_CLIENT_ID = env_str("JUPYTERHUB_OAUTH_CLIENT_ID", "jupyterhub")
JUPYTERHUB_OAUTH_CLIENT_SECRET = env_str("JUPYTERHUB_OAUTH_CLIENT_SECRET", "")
# How notebook servers and the hub reach the workbench (its public URL).
WORKBENCH_URL = env_str("WORKBENCH_URL", "http://127.0.0.1:8000").rstrip("/")
NOTEBOOK_IDLE_TIMEOUT_SECONDS = env_int("NOTEBOOK_IDLE_TIMEOUT_SECONDS", 3600, minimum=60)
NOTEBOOK_MAX_AGE_SECONDS = env_int("NOTEBOOK_MAX_AGE_SECONDS", 8 * 3600, minimum=300)
NOTEBOOK_MAX_SERVERS_PER_USER = env_int("NOTEBOOK_MAX_SERVERS_PER_USER", 2, minimum=1)
# The tracking server a notebook is handed (MLFLOW_TRACKING_URI in it); empty: none, where
# notebooks cannot reach it (compose.yaml keeps them off MLflow's network).
NOTEBOOK_MLFLOW_TRACKING_URI = env_str("NOTEBOOK_MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI)
# A server's API token outlives the server's maximum age a little, never much more: the
# token is revoked when the server stops, and expiry covers a stop the workbench missed.
NOTEBOOK_TOKEN_LIFETIME_SECONDS = env_int(
    "NOTEBOOK_TOKEN_LIFETIME_SECONDS", NOTEBOOK_MAX_AGE_SECONDS + 900, minimum=60
)
# Redirect URIs the OAuth provider accepts: https only in production (RFC 9700).
OAUTH_REDIRECT_SCHEMES = env_list(
    "OAUTH_REDIRECT_SCHEMES", ["https"] if PRODUCTION else ["http", "https"]
)
if not OAUTH_REDIRECT_SCHEMES or set(OAUTH_REDIRECT_SCHEMES) - {"http", "https"}:
    raise ImproperlyConfigured("OAUTH_REDIRECT_SCHEMES must list http and/or https")
OAUTH2_PROVIDER = {
    "SCOPES": {"profile": "Your username, e-mail address and tenants"},
    "DEFAULT_SCOPES": ["profile"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
    "PKCE_REQUIRED": True,
    "ALLOWED_REDIRECT_URI_SCHEMES": OAUTH_REDIRECT_SCHEMES,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    # The secure behaviours of RFC 9700 (OAuth 2.0 security BCP), ahead of their default.
    **{
        f"COMPLIANT_BCP_RFC9700_{name}": True
        for name in (
            "IMPLICIT_GRANT",
            "PASSWORD_GRANT",
            "PKCE_METHOD",
            "ACCESS_TOKEN_TRANSPORT",
            "AUTHZ_RESPONSE_ISS",
            "TOKEN_STORAGE",
        )
    },
}

# --- Content-Security-Policy (django-csp) -----------------------------------------------
# Scripts and styles come from our own origin, or inline with the request's nonce
# (``nonce="{{ request.csp_nonce }}"``); nothing may frame a page. Forms post to us, and to
# the hub: the OAuth sign-in ends in a redirect there, which form-action also governs.
_hub = urlsplit(JUPYTERHUB_PUBLIC_URL)
# (Not a setting named CSP_*: django-csp takes those for its pre-4.0 configuration.)
_csp_report_uri = env_str("CSP_REPORT_URI", "")
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "frame-ancestors": [NONE],
        "form-action": [SELF, f"{_hub.scheme}://{_hub.netloc}"],
        **({"report-uri": [_csp_report_uri]} if _csp_report_uri else {}),
    },
}

# --- celery ---------------------------------------------------------------------------
CELERY_BROKER_URL = env_str(
    "CELERY_BROKER_URL", f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}"
)
# Redis's password apart from the URL, so it can be a secret file (REDIS_PASSWORD_FILE).
REDIS_PASSWORD = env_str("REDIS_PASSWORD", "")
if REDIS_PASSWORD:
    CELERY_BROKER_URL = url_with_password(
        "CELERY_BROKER_URL", CELERY_BROKER_URL, "REDIS_PASSWORD", REDIS_PASSWORD
    )
    # Celery takes the CELERY_BROKER_URL environment variable over its settings (its own
    # --broker option works by setting it), so that must carry the password too.
    os.environ["CELERY_BROKER_URL"] = CELERY_BROKER_URL
# (The embedded sqla broker's polling interval is set in workbench/celery.py.)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 300, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 360, minimum=1)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Keep the real stdout/stderr in worker processes: Ray's driver (deployment tasks) enables
# faulthandler on sys.stderr, which Celery's logging proxy cannot give a file number.
CELERY_WORKER_REDIRECT_STDOUTS = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "cleanup-stale-uploads": {"task": "core.cleanup_stale_uploads", "schedule": 3600.0},
    # A worker killed mid-run stops heartbeating; this puts its run back in the queue.
    "requeue-stale-runs": {"task": "training.requeue_stale", "schedule": 10.0},
    "dispatch-runs": {"task": "training.dispatch", "schedule": 30.0},
    # Runs dispatched but never claimed (message lost), and evaluations whose worker died
    # or whose message was lost, are sent again.
    "redispatch-lost-runs": {"task": "training.redispatch_lost", "schedule": 10.0},
    "requeue-stale-evaluations": {"task": "evaluation.requeue_stale", "schedule": 10.0},
    "check-waiting-promotions": {"task": "promotions.check_waiting", "schedule": 30.0},
    # Campaigns: due schedules and new training versions fire; items whose run or
    # promotion moved on without a nudge (a lost message) move on here.
    "advance-campaigns": {"task": "campaigns.advance_all", "schedule": 15.0},
    # Batch predictions: queued jobs sent within their tenant's bound; lost workers' jobs
    # resumed elsewhere, lost messages sent again.
    "dispatch-batch-predictions": {"task": "batch.dispatch", "schedule": 15.0},
    "requeue-stale-batch-predictions": {"task": "batch.requeue_stale", "schedule": 10.0},
    # Model health reports older than MODEL_HEALTH_MAX_AGE_S are recomputed.
    "refresh-model-health": {"task": "registry.refresh_stale_health", "schedule": 60.0},
    # (Deployments, warm-ups and the fleet are the fleet controller's, not beat's.)
    # Servers stopped by the hub (idle culler, maximum age) lose their API token here.
    "sync-notebooks": {"task": "notebooks.sync", "schedule": 30.0},
}
CELERY_TASK_ROUTES = {
    "training.execute_run": {"queue": TRAINING_QUEUE},
    "evaluation.run": {"queue": TRAINING_QUEUE},
    "batch.execute": {"queue": TRAINING_QUEUE},
}
# One training task at a time per worker process slot; do not prefetch a second run.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# --- metrics --------------------------------------------------------------------------
# Web and worker processes write their samples into one directory so /metrics shows
# task counts recorded by the workers too (prometheus_client multiprocess mode).
PROMETHEUS_MULTIPROC_DIR = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "prometheus")
)
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

# --- REST API -------------------------------------------------------------------------
# Requests per API token (or per signed-in user) per second|minute|hour|day; over it, 429
# with Retry-After. Generous by default (automation and benchmarks run unthrottled): set
# it to what your automation needs. Counts live in the cache below (CACHE_URL).
API_THROTTLE_RATE = env_str("API_THROTTLE_RATE", "30000/minute")
if not re.fullmatch(r"[1-9][0-9]*/(second|minute|hour|day)", API_THROTTLE_RATE):
    raise ImproperlyConfigured(
        f"API_THROTTLE_RATE={API_THROTTLE_RATE!r} is not <number>/<second|minute|hour|day>"
    )
# Blank: each web process counts on its own (in memory); redis://...: one count for all.
CACHE_URL = env_str("CACHE_URL", "")
if CACHE_URL and urlsplit(CACHE_URL).scheme not in ("redis", "rediss"):
    raise ImproperlyConfigured(f"CACHE_URL={CACHE_URL!r} must be a redis:// or rediss:// URL")
if CACHE_URL and REDIS_PASSWORD:  # one Redis, one password (REDIS_PASSWORD_FILE)
    CACHE_URL = url_with_password("CACHE_URL", CACHE_URL, "REDIS_PASSWORD", REDIS_PASSWORD)
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
    if CACHE_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.tenants.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "apps.notebooks.permissions.NotebookTokenLimits",
    ],
    "DEFAULT_PAGINATION_CLASS": "apps.core.api.Pagination",
    # JSON only: DRF's browsable pages need inline styles the Content-Security-Policy
    # refuses; /api/v1/docs/ is the API's page for people.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    # Error responses and links on every operation (apps/core/schema.py).
    "DEFAULT_SCHEMA_CLASS": "apps.core.schema.WorkbenchAutoSchema",
    "DEFAULT_METADATA_CLASS": "apps.core.metadata.Metadata",
    "EXCEPTION_HANDLER": "apps.core.api.exception_handler",
    # One rate per API token (per user for the dashboard's session): API_THROTTLE_RATE.
    "DEFAULT_THROTTLE_CLASSES": ["apps.core.throttling.TokenRateThrottle"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Workbench API",
    "DESCRIPTION": "Per-tenant datasets, training, evaluation, promotion and serving.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "apps.core.schema.link_ids",
    ],
    "ENUM_NAME_OVERRIDES": {
        "DatasetKindEnum": "apps.datasets.models.DatasetKind",
        "ModelKindEnum": "apps.registry.models.ModelKind",
        "RunStatusEnum": "apps.training.models.RunStatus",
        "EvaluationStatusEnum": "apps.evaluation.models.EvalStatus",
        "PromotionStatusEnum": "apps.promotions.models.PromotionStatus",
        "DeploymentStatusEnum": "apps.deployments.models.DeploymentStatus",
        # Promotion targets and deployment environments are the same two names.
        "EnvironmentEnum": "apps.deployments.models.Environment",
        # A member's role, and the embed API's role (an encoder).
        "RoleEnum": "apps.tenants.models.Role",
        "EmbeddingRoleEnum": "apps.deployments.models.EmbeddingRole",
        "CompletionStrategyEnum": "apps.deployments.models.CompletionStrategy",
        "NotebookStatusEnum": "apps.notebooks.models.NotebookStatus",
        "AccessRequestStatusEnum": "apps.notebooks.models.AccessStatus",
        # Two fields named "format": a dataset version's file, a model version's artifact.
        "DatasetFormatEnum": "apps.datasets.models.DatasetVersion.Format",
        "ArtifactFormatEnum": "apps.registry.models.ArtifactFormat",
        # Two fields named "trigger": what set off a warm-up, what fires a campaign.
        "WarmupTriggerEnum": "apps.deployments.models.WarmupTrigger",
        "CampaignTriggerEnum": "apps.campaigns.models.Trigger",
        "CampaignStatusEnum": "apps.campaigns.models.CampaignStatus",
        "SkipReasonEnum": "apps.campaigns.models.SkipReason",
    },
}

# --- logging --------------------------------------------------------------------------
LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "apps.core.logging.RequestIdFilter"}},
    "formatters": {"json": {"()": "apps.core.logging.JsonFormatter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "workbench@localhost")
