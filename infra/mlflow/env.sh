# Environment for jobs that report to the shared MLflow server (source it, or put the values in the
# RayJob runtimeEnvYAML / `enat submit --runtime-env-json`).
export MLFLOW_TRACKING_URI=http://mlflow.mlflow.svc.cluster.local:5000
# Object storage for datasets and checkpoints: the standard AWS chain (instance profile, IRSA, or
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). For S3-compatible stores also set:
# export AWS_ENDPOINT_URL=http://minio.minio:9000
