//! A tiny HTTP server on a loopback port for `bench` and `torture`: it
//! answers every request at once with a fixed JSON body and counts the
//! `Idempotency-Key` headers it sees.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// How often each idempotency key arrived.
pub type KeyCounts = Arc<Mutex<HashMap<String, u32>>>;

/// Picks the status of a response from the request's path.
pub type StatusOf = Arc<dyn Fn(&str) -> u16 + Send + Sync>;

/// Serves until the process ends; returns the address and the key counts.
pub async fn serve(reply: &'static str) -> Result<(SocketAddr, KeyCounts)> {
    serve_with(reply, Arc::new(|_| 200)).await
}

/// The same, answering with the status `status_of` picks for each path.
pub async fn serve_with(
    reply: &'static str,
    status_of: StatusOf,
) -> Result<(SocketAddr, KeyCounts)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let keys = KeyCounts::default();
    let counts = keys.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (keys, status_of) = (keys.clone(), status_of.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let keys = keys.clone();
                    let status = status_of(request.uri().path());
                    async move {
                        if let Some(key) = request.headers().get("idempotency-key") {
                            let key = String::from_utf8_lossy(key.as_bytes()).into_owned();
                            *keys.lock().unwrap().entry(key).or_default() += 1;
                        }
                        let _ = request.into_body().collect().await;
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(reply.as_bytes())))
                            .expect("a static response is valid");
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, counts))
}
