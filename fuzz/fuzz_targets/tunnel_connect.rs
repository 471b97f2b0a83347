//! The inbound side of the tunnel: what a peer agent sends on an mTLS
//! connection to port 15008, read by real h2, and where each `CONNECT` may
//! go (`proxy::inbound::admit`) in the cluster of [`ferry_fuzz::WORKLOADS`]
//! as [`ferry_fuzz::NODE`] sees it. And the client's side of a refusal: the
//! reason it reads back (`tunnel::wire::refusal_reason`).
//!
//! Input: a first byte (see [`ferry_fuzz::tunnel_byte`]: the mode, and the
//! local and client identities of the tunnel connection), then
//! - mode 0: what the client writes after the HTTP/2 connection preface
//!   (SETTINGS, HEADERS with HPACK, …); an h2 server reads it, up to
//!   [`MAX_STREAMS`] requests, and answers each the way the agent does;
//! - mode 1: `ferry-reason` header values, separated by `\n`, on a refusal.
//!
//! What must hold: an admitted `CONNECT` is a `CONNECT` whose authority
//! parses back to the admitted address; that address is an IP of a pod of
//! the table, on this node, meshed, whose identity (its namespace and
//! ServiceAccount in the local trust domain) is the one this end presented,
//! and the pod named is that pod; and the policy allows the client, by the
//! rules of `WORKLOADS` worked out here without the policy code. A request
//! is refused for its method exactly when it is not a `CONNECT`, as not
//! local exactly when it names a pod of another node, as not meshed only
//! for a local unmeshed pod. Every refusal says why in a clean message, and its
//! answer carries that message to the client intact. A reason read back is
//! empty or the first header's text, which has no control character but a
//! tab (logged through `Untrusted`, which escapes it).

#![no_main]

use std::{net::SocketAddr, sync::OnceLock, task::Poll, time::Duration};

use bytes::Bytes;
use ferry_agent::{
    proxy::{
        Refused,
        inbound::{Admitted, Peer, admit},
    },
    tunnel::wire,
    workload::Workload,
};
use ferry_fuzz::{NODE, PREFACE, assert_clean_message, tunnel_peer, workload_table};
use ferry_proto::{SpiffeId, Untrusted};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Notify,
};

/// Requests read from one input: enough for every kind of stream to meet
/// the others on one connection, few enough to stay fast.
const MAX_STREAMS: usize = 8;
/// Nothing here waits on a network; an input that is not done by then is
/// dropped, not reported (h2 waiting for more frames is no bug).
const TIMEOUT: Duration = Duration::from_secs(2);

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (mode, peer) = tunnel_peer(first);
    if mode == 1 {
        reason(rest);
        return;
    }
    runtime().block_on(async {
        let _ = tokio::time::timeout(TIMEOUT, serve(rest, &peer)).await;
    });
});

/// The PING the client sends after the input's frames, and the server's
/// answer to it: once the answer is back, h2 has read every frame before it.
const PING: [u8; 17] = *b"\0\0\x08\x06\0\0\0\0\0ferryfuz";
const PING_ACK: [u8; 17] = *b"\0\0\x08\x06\x01\0\0\0\0ferryfuz";

/// An h2 server, configured as the agent's tunnel server, reading `frames`
/// after the preface, as `Inbound` does: each request admitted or refused.
///
/// The client's side stays open: h2 would take its end for a broken
/// connection and drop requests it has read but not yet handed out (the
/// break-it-on-purpose check found this target never reached `admit` when
/// the client's side closed after the input). The whole frames of the input
/// end with a [`PING`] instead; once its answer is back, the server hands
/// out what it holds and the input is done.
async fn serve(frames: &[u8], peer: &Peer) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let answered = Notify::new();
    let write = async {
        let _ = to_server.write_all(PREFACE).await;
        let _ = to_server.write_all(whole_frames(frames)).await;
        let _ = to_server.write_all(&PING).await;
    };
    // Whatever the server answers is read, so it never waits on a full pipe.
    let read = async {
        let mut seen = Vec::new();
        let mut buffer = [0; 4096];
        while let Ok(n @ 1..) = from_server.read(&mut buffer).await {
            seen.extend_from_slice(&buffer[..n]);
            if seen.windows(PING_ACK.len()).any(|w| w == PING_ACK) {
                answered.notify_one();
                seen.clear();
            }
        }
    };
    let accept = async {
        let Ok(mut connection) = h2::server::Builder::new()
            .initial_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW)
            .max_frame_size(wire::MAX_FRAME_SIZE)
            .max_concurrent_streams(wire::MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(server)
            .await
        else {
            return;
        };
        let (mut served, mut done) = (0, false);
        while served < MAX_STREAMS {
            let next = if done {
                // Only what h2 holds already: it has read the whole input.
                match std::future::poll_fn(|cx| Poll::Ready(connection.poll_accept(cx))).await {
                    Poll::Ready(next) => next,
                    Poll::Pending => return,
                }
            } else {
                tokio::select! {
                    next = connection.accept() => next,
                    () = answered.notified() => {
                        done = true;
                        continue;
                    }
                }
            };
            let Some(Ok((request, mut respond))) = next else {
                return;
            };
            let answer = check(&request, peer);
            let _ = respond.send_response(answer, true);
            served += 1;
        }
    };
    // The server's end closes when `accept` is done, which ends `read`.
    tokio::join!(write, read, accept);
}

/// `frames` up to the end of its last whole frame (9 bytes of header, then
/// as many as its length says): h2 waits for the rest of a frame cut short,
/// and would never answer the [`PING`] after it.
fn whole_frames(frames: &[u8]) -> &[u8] {
    let mut end = 0;
    while let Some(header) = frames.get(end..end + 9) {
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        if frames.len() < end + 9 + length {
            break;
        }
        end += 9 + length;
    }
    &frames[..end]
}

/// The admission of one request, checked; the answer the agent would send.
fn check<B>(request: &Request<B>, peer: &Peer) -> Response<()> {
    let table = workload_table();
    let (method, uri) = (request.method(), request.uri());
    match admit(method, uri, table, NODE, peer) {
        Ok(admitted) => {
            admitted_rightly(method, uri, &admitted, peer);
            Response::new(())
        }
        Err(refused) => {
            refused_rightly(method, uri, &refused);
            let message = refused.to_string();
            assert_clean_message(&message, &refused);
            let status = refused.status();
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{refused:?} answered {status}"
            );
            let answer = wire::refusal(status, &message);
            assert_eq!(
                wire::refusal_reason(&answer),
                message,
                "the client's agent would not learn why: {refused:?}"
            );
            answer
        }
    }
}

fn admitted_rightly(method: &Method, uri: &Uri, admitted: &Admitted, peer: &Peer) {
    assert_eq!(method, Method::CONNECT, "admitted a {method} {uri}");
    let authority = uri
        .authority()
        .expect("an admitted CONNECT has an authority");
    assert_eq!(
        authority.as_str().parse::<SocketAddr>().ok(),
        Some(admitted.address),
        "{authority} is not the admitted {}",
        admitted.address
    );
    let ip = admitted.address.ip().to_canonical();
    let pods: Vec<&Workload> = workload_table()
        .workloads
        .iter()
        .map(AsRef::as_ref)
        .filter(|w| w.ips.iter().any(|own| own.to_canonical() == ip))
        .collect();
    let [pod] = pods[..] else {
        panic!("{admitted:?}: the address is the IP of {} pods", pods.len());
    };
    assert_eq!(admitted.pod, pod.key());
    assert_eq!(pod.node, NODE, "{admitted:?} is a pod of {}", pod.node);
    assert!(pod.meshed, "{admitted:?} is not meshed");
    let runs_as = format!(
        "spiffe://{}/ns/{}/sa/{}",
        peer.local.trust_domain(),
        pod.namespace,
        pod.service_account
    );
    assert_eq!(
        runs_as,
        peer.local.to_string(),
        "{admitted:?} runs as {runs_as}, not as the tunnel's identity"
    );
    assert!(
        allowed(pod, admitted.address.port(), &peer.client),
        "{admitted:?} for {}, whom the policies of WORKLOADS refuse",
        peer.client
    );
}

/// Who may reach what in [`ferry_fuzz::WORKLOADS`], read off its policies:
/// the `Deny` of shop/db on every pod of shop wins; the `Allow` on port 8080
/// of the pods labelled app=api names namespace ops and shop/web.v2; else
/// shop's default, same-namespace. Other trust domains never reach a pod.
fn allowed(pod: &Workload, port: u16, client: &SpiffeId) -> bool {
    if client.trust_domain() != "cluster.local" {
        return false;
    }
    let (namespace, account) = (client.namespace(), client.service_account());
    if pod.namespace == "shop" && (namespace, account) == ("shop", "db") {
        return false;
    }
    if pod.labels.get("app").is_some_and(|app| app == "api") && port == 8080 {
        return namespace == "ops" || (namespace, account) == ("shop", "web.v2");
    }
    namespace == pod.namespace
}

/// A refusal names what the request was: the kind of refusal and the
/// request agree.
fn refused_rightly(method: &Method, uri: &Uri, refused: &Refused) {
    assert_eq!(
        matches!(refused, Refused::Method(_)),
        method != Method::CONNECT,
        "{method} {uri} refused as {refused:?}"
    );
    let pod = || {
        let address: SocketAddr = uri.authority()?.as_str().parse().ok()?;
        workload_table().by_ip(address.ip()).cloned()
    };
    match refused {
        Refused::NotLocal { node, local, .. } => {
            let pod = pod().expect("a pod that is not local is a pod");
            assert_eq!((&pod.node, local.as_str()), (node, NODE));
            assert_ne!(pod.node, NODE, "{pod:?} is local");
        }
        Refused::NotMeshed(key) => {
            let pod = pod().expect("a pod that is not meshed is a pod");
            assert_eq!(&pod.key(), key);
            assert!(!pod.meshed && pod.node == NODE, "{pod:?}");
        }
        Refused::NoPod(ip) => assert!(pod().is_none(), "{ip} is a pod's"),
        _ => {}
    }
    // And the other way: a CONNECT to a pod of another node is refused for
    // that, before anything about the pod or the caller is looked at (the
    // policies would refuse it too, but then the client would not learn why).
    if method == Method::CONNECT
        && let Some(pod) = pod()
        && pod.node != NODE
    {
        assert!(
            matches!(refused, Refused::NotLocal { .. }),
            "{} of {} refused as {refused:?}",
            pod.key(),
            pod.node
        );
    }
}

/// Mode 1: the reason a client's agent reads from a refusal.
fn reason(values: &[u8]) {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::FORBIDDEN;
    let mut first = None;
    for value in values.split(|&b| b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            first.get_or_insert_with(|| value.as_bytes().to_vec());
            response.headers_mut().append(wire::REASON_HEADER, value);
        }
    }
    let reason = wire::refusal_reason(&response);
    if !reason.is_empty() {
        assert_eq!(
            Some(reason.as_bytes()),
            first.as_deref(),
            "the reason is the first header's text"
        );
    }
    // What a header's text may hold: visible ASCII and tab, nothing lost of it.
    let visible = |b: &u8| (0x20..0x7f).contains(b) || *b == b'\t';
    if let Some(first) = &first
        && first.iter().all(visible)
    {
        assert_eq!(
            reason.as_bytes(),
            &first[..],
            "a visible reason is kept whole"
        );
    }
    assert!(
        !reason.chars().any(|c| c.is_control() && c != '\t'),
        "control character in the reason {reason:?}"
    );
    let logged = Untrusted(&reason).to_string();
    assert!(
        !logged.chars().any(char::is_control),
        "the reason is logged with a control character: {logged:?}"
    );
    // The server's side: any message makes a refusal whose reason is that
    // message or, if a header cannot carry it, none.
    if let Ok(message) = std::str::from_utf8(values) {
        let carried = wire::refusal_reason(&wire::refusal(StatusCode::FORBIDDEN, message));
        assert!(
            carried.is_empty() || carried == message,
            "{message:?} came back as {carried:?}"
        );
    }
}

/// One current-thread runtime for the whole run, with timers for [`TIMEOUT`].
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}
