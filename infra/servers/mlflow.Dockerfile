# The official MLflow image (same version as the project's pin) plus the PostgreSQL driver and the S3 client
# that `--backend-store-uri postgresql://` and `--artifacts-destination s3://` need, and Flask-WTF, which
# `--app-name basic-auth` needs (MLflow's `auth` extra: Flask-WTF<2).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3 flask-wtf==1.3.0
