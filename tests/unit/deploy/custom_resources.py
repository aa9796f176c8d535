"""JSON schemas for the custom resources the deployment uses, limited to the fields we rely on.

Kubernetes' own schemas do not cover CRDs, so these are written from the operators' API types
(CloudNativePG `api/v1/*_types.go`, cert-manager `certmanager/v1`, the Barman Cloud plugin's
`ObjectStoreSpec`). Objects we fill in refuse unknown keys, so a misspelt field fails here instead of
being dropped by the API server.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def strict(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STRING: Schema = {"type": "string", "minLength": 1}
DURATION: Schema = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
QUANTITY: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$"}
METADATA = strict(
    {
        "name": STRING,
        "namespace": STRING,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    ("name",),
)
SECRET_KEY_REF = strict({"name": STRING, "key": STRING}, ("name", "key"))
RESOURCES = strict(
    {
        "requests": strict({"cpu": QUANTITY, "memory": QUANTITY}),
        "limits": strict({"cpu": QUANTITY, "memory": QUANTITY}),
    }
)


def resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return strict(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


ISSUER_REF = strict(
    {"name": STRING, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": {"const": "cert-manager.io"}},
    ("name",),
)
KEY_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]

CERTIFICATE = resource(
    "cert-manager.io/v1",
    "Certificate",
    strict(
        {
            "secretName": STRING,
            "commonName": STRING,
            "isCA": {"type": "boolean"},
            "dnsNames": {"type": "array", "items": STRING, "minItems": 1},
            "uris": {"type": "array", "items": STRING, "minItems": 1},
            "usages": {"type": "array", "items": {"enum": KEY_USAGES}, "minItems": 1},
            "duration": DURATION,
            "renewBefore": DURATION,
            "privateKey": strict(
                {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                }
            ),
            "issuerRef": ISSUER_REF,
        },
        ("secretName", "issuerRef"),
    ),
)

ISSUER = resource(
    "cert-manager.io/v1",
    "Issuer",
    {
        "type": "object",
        "properties": {
            "selfSigned": strict({}),
            "ca": strict({"secretName": STRING}, ("secretName",)),
        },
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
    },
)

LABEL_SELECTOR = strict({"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}})
PLUGIN = strict(
    {
        "name": STRING,
        "enabled": {"type": "boolean"},
        "isWALArchiver": {"type": "boolean"},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    ("name",),
)

CLUSTER = resource(
    "postgresql.cnpg.io/v1",
    "Cluster",
    strict(
        {
            "instances": {"type": "integer", "minimum": 1},
            "imageName": STRING,
            "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
            "postgresql": strict(
                {
                    "synchronous": strict(
                        {
                            "method": {"enum": ["any", "first"]},
                            "number": {"type": "integer", "minimum": 1},
                            "dataDurability": {"enum": ["required", "preferred"]},
                        },
                        ("method", "number"),
                    ),
                    "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
                }
            ),
            "bootstrap": strict(
                {
                    "initdb": strict({"database": STRING, "owner": STRING}, ("database", "owner")),
                    "recovery": strict({"source": STRING}, ("source",)),
                },
            ),
            "storage": strict({"size": QUANTITY, "storageClass": STRING}, ("size",)),
            "resources": RESOURCES,
            "affinity": strict(
                {
                    "enablePodAntiAffinity": {"type": "boolean"},
                    "topologyKey": STRING,
                    "podAntiAffinityType": {"enum": ["preferred", "required"]},
                }
            ),
            "topologySpreadConstraints": {
                "type": "array",
                "items": strict(
                    {
                        "maxSkew": {"type": "integer", "minimum": 1},
                        "topologyKey": STRING,
                        "whenUnsatisfiable": {"enum": ["DoNotSchedule", "ScheduleAnyway"]},
                        "labelSelector": LABEL_SELECTOR,
                    },
                    ("maxSkew", "topologyKey", "whenUnsatisfiable"),
                ),
            },
            "plugins": {"type": "array", "items": PLUGIN},
        },
        ("instances",),
    ),
)

SCHEDULED_BACKUP = resource(
    "postgresql.cnpg.io/v1",
    "ScheduledBackup",
    strict(
        {
            # Six fields, seconds first (robfig/cron with seconds).
            "schedule": {"type": "string", "pattern": r"^\S+( \S+){5}$"},
            "immediate": {"type": "boolean"},
            "backupOwnerReference": {"enum": ["none", "self", "cluster"]},
            "cluster": strict({"name": STRING}, ("name",)),
            "method": {"enum": ["barmanObjectStore", "volumeSnapshot", "plugin"]},
            "pluginConfiguration": strict(
                {
                    "name": STRING,
                    "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                ("name",),
            ),
        },
        ("schedule", "cluster"),
    ),
)

OBJECT_STORE = resource(
    "barmancloud.cnpg.io/v1",
    "ObjectStore",
    strict(
        {
            "retentionPolicy": {"type": "string", "pattern": r"^[1-9][0-9]*[dwm]$"},
            "configuration": strict(
                {
                    "destinationPath": {"type": "string", "pattern": r"^(s3|gs|https?)://"},
                    "endpointURL": STRING,
                    "s3Credentials": strict(
                        {"accessKeyId": SECRET_KEY_REF, "secretAccessKey": SECRET_KEY_REF},
                        ("accessKeyId", "secretAccessKey"),
                    ),
                    "wal": strict(
                        {"compression": {"enum": ["gzip", "bzip2", "snappy", "lz4", "xz", "zstd"]}}
                    ),
                    "data": strict(
                        {"compression": {"enum": ["gzip", "bzip2", "snappy", "lz4", "xz", "zstd"]}}
                    ),
                },
                ("destinationPath",),
            ),
        },
        ("configuration",),
    ),
)

SCHEMAS: dict[tuple[str, str], Schema] = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("postgresql.cnpg.io/v1", "Cluster"): CLUSTER,
    ("postgresql.cnpg.io/v1", "ScheduledBackup"): SCHEDULED_BACKUP,
    ("barmancloud.cnpg.io/v1", "ObjectStore"): OBJECT_STORE,
}
