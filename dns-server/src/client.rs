//! The client subcommands (`namespace`, `status`, `stats`, `export`): small HTTP calls to a
//! running server, printing its JSON answers or its error message.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::config::{ClientArgs, Command, ExportFormat, NamespaceCommand};
use crate::export::{self, ExportOptions};
use shared::model::MembraneView;

/// A failed client call; the binary exits 1 (64 for [`ClientError::Usage`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot reach the registry at {url}: {message}")]
    Unreachable {
        /// URL.
        url: String,
        /// Cause.
        message: String,
    },
    /// The server answered with an error.
    #[error("registry answered {status}: {message}")]
    Server {
        /// Status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
}

struct Http {
    base: String,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new(args: &ClientArgs) -> Result<Self, ClientError> {
        let base = args
            .url
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches('/')
            .to_string();
        if !base.starts_with("http://") {
            return Err(ClientError::Usage(format!(
                "--url {base:?} must start with http://"
            )));
        }
        Ok(Http {
            base,
            token: args.token.clone().filter(|t| !t.is_empty()),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Bytes, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        };
        let resp = self.client.request(req).await.map_err(|e| {
            // The useful cause (connection refused, ...) is in the source chain.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = s.to_string();
                src = s.source();
            }
            unreachable(&msg)
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<shared::ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| {
                format!(
                    "not a membrane registry answer: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                )
            });
        Err(ClientError::Server { status, message })
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let bytes = self.call(method, path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|_| ClientError::Unreachable {
            url: self.base.clone(),
            message: "the answer is not JSON: is this a membrane registry?".into(),
        })
    }
}

/// The namespace's membranes (404 when the namespace does not exist).
async fn fetch_membranes(http: &Http, ns: &str) -> Result<Vec<MembraneView>, ClientError> {
    #[derive(serde::Deserialize)]
    struct List {
        membranes: Vec<MembraneView>,
    }
    let bytes = http
        .call(Method::GET, &format!("/v1/namespaces/{ns}/membranes"), None)
        .await?;
    let list: List = serde_json::from_slice(&bytes).map_err(|e| ClientError::Unreachable {
        url: http.base.clone(),
        message: format!("unexpected membrane list: {e}"),
    })?;
    Ok(list.membranes)
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn label(kind: &'static str, s: &str) -> Result<String, ClientError> {
    shared::name::validate_label(kind, s).map_err(|e| ClientError::Usage(e.to_string()))
}

/// Runs a client subcommand.
pub async fn run(cmd: Command) -> Result<(), ClientError> {
    match cmd {
        Command::Namespace(NamespaceCommand::Create {
            name,
            description,
            client,
        }) => {
            let name = label("namespace", &name)?;
            let body = json!({"name": name, "description": description.unwrap_or_default()});
            print(
                &Http::new(&client)?
                    .json(Method::POST, "/v1/namespaces", Some(body))
                    .await?,
            );
        }
        Command::Namespace(NamespaceCommand::List(client)) => {
            print(
                &Http::new(&client)?
                    .json(Method::GET, "/v1/namespaces", None)
                    .await?,
            );
        }
        Command::Namespace(NamespaceCommand::Delete {
            name,
            force,
            client,
        }) => {
            let name = label("namespace", &name)?;
            let path = format!("/v1/namespaces/{name}?force={force}");
            Http::new(&client)?
                .call(Method::DELETE, &path, None)
                .await?;
            println!("namespace {name} deleted");
        }
        Command::Status(client) => {
            print(
                &Http::new(&client)?
                    .json(Method::GET, "/status", None)
                    .await?,
            );
        }
        Command::Stats(client) => {
            print(
                &Http::new(&client)?
                    .json(Method::GET, "/v1/stats", None)
                    .await?,
            );
        }
        Command::Export {
            namespace,
            format,
            image,
            app_image,
            shared_claim,
            client,
        } => {
            let ns = label("namespace", &namespace)?;
            let http = Http::new(&client)?;
            match format {
                ExportFormat::Zone => {
                    let bytes = http
                        .call(Method::GET, &format!("/v1/namespaces/{ns}/zone"), None)
                        .await?;
                    print!("{}", String::from_utf8_lossy(&bytes));
                }
                ExportFormat::Compose | ExportFormat::K8s => {
                    let opts = ExportOptions {
                        namespace: ns.clone(),
                        image,
                        app_image,
                        shared_claim,
                    };
                    let membranes = fetch_membranes(&http, &ns).await?;
                    let out = if format == ExportFormat::Compose {
                        export::compose(&membranes, &opts)
                    } else {
                        export::kubernetes(&membranes, &opts)
                    };
                    print!("{out}");
                }
            }
        }
    }
    Ok(())
}
