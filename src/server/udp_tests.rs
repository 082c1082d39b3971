//! The batched UDP loop against a real upstream on loopback: datagrams queued before the loop
//! starts are read together, and every client gets its own reply whatever else the batch held.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use super::super::handler::fast_path_tests::handler_observed;
use super::super::mmsg::{BATCH, Batch};
use super::{MAX_PENDING, send_replies, serve_udp};

/// What the log said of one query: client, name, error.
type Logged = Arc<Mutex<Vec<(SocketAddr, String, Option<String>)>>>;

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message.to_vec().unwrap()
}

fn client() -> StdUdpSocket {
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

fn reply_of(socket: &StdUdpSocket) -> Message {
    let mut buf = [0u8; 4096];
    let (len, _) = socket.recv_from(&mut buf).expect("a reply");
    Message::from_vec(&buf[..len]).unwrap()
}

fn addresses(reply: &Message) -> Vec<String> {
    reply
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect()
}

/// A UDP datagram from port 0 to `to`, written with a raw socket (needs CAP_NET_RAW), or from
/// `from_port` for the control.
fn raw_udp(to: SocketAddr, from_port: u16, payload: &[u8]) {
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    let mut packet = Vec::new();
    packet.extend_from_slice(&from_port.to_be_bytes());
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    packet.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
    packet.extend_from_slice(payload);
    raw.send_to(&packet, &to.into()).unwrap();
}

fn is_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the port-0 case needs root (a raw socket) and CI is set: refusing to skip"
    );
    eprintln!("skipping the port-0 case: needs root");
    false
}

/// `recvmmsg` takes everything waiting, [`BATCH`] at a time, each datagram with its own
/// sender and length.
#[test]
fn one_receive_takes_a_whole_batch_of_waiting_datagrams() {
    let server = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let to = server.local_addr().unwrap();
    let clients: Vec<StdUdpSocket> = (0..BATCH + 8).map(|_| client()).collect();
    for (i, client) in clients.iter().enumerate() {
        client
            .send_to(&vec![u8::try_from(i).unwrap(); i + 1], to)
            .unwrap();
    }
    let mut batch = Batch::new();
    let mut seen = Vec::new();
    let mut batches = Vec::new();
    while seen.len() < clients.len() {
        let received = batch.receive(&server).expect("datagrams are waiting");
        batches.push(received);
        for index in 0..received {
            let (datagram, peer, _) = batch.datagram(index, 0).unwrap();
            seen.push((datagram.to_vec(), peer));
        }
    }
    assert_eq!(batches, vec![BATCH, 8], "one call per full batch");
    for (i, client) in clients.iter().enumerate() {
        let want = (
            vec![u8::try_from(i).unwrap(); i + 1],
            client.local_addr().unwrap(),
        );
        assert_eq!(seen[i], want, "datagram {i}");
    }
    let error = batch.receive(&server).expect_err("nothing left");
    assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);
}

/// One `sendmmsg` batch where one reply cannot be sent (an IPv6 peer on an IPv4 socket): that
/// reply alone reports the error, the ones before and after it still leave.
#[tokio::test]
async fn a_reply_that_cannot_be_sent_fails_alone() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let clients: Vec<StdUdpSocket> = (0..3).map(|_| client()).collect();
    let mut peers: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    peers[1] = "[::1]:9".parse().unwrap();
    let mut batch = Batch::new();
    for slot in 0..3 {
        let reply = batch.reply_mut(slot).unwrap();
        reply.clear();
        reply.extend_from_slice(format!("reply {slot}").as_bytes());
    }
    batch.set_peers(peers.iter().copied());
    let mut results = Vec::new();
    send_replies(&server, &batch, &mut results).await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].is_err(), "{results:?}");
    let mut buf = [0u8; 64];
    for slot in [0, 2] {
        let (len, _) = clients[slot].recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], format!("reply {slot}").as_bytes());
    }
}

/// A batch mixing cache hits, denials, misses (the full path, through the upstream), garbage,
/// a client that closed its socket and a datagram from port 0: every live client gets the
/// reply to its own question with its own ID, the log has one record per datagram (none for
/// port 0), and the loops keep serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_burst_is_answered_client_by_client() {
    let logged: Logged = Arc::default();
    let sink = logged.clone();
    let observer: crate::querylog::Observer = Arc::new(move |record| {
        sink.lock().unwrap().push((
            SocketAddr::new(record.client, record.port),
            record.qname.to_string(),
            record.error.clone(),
        ));
    });
    let (handler, _up) = handler_observed("", Some(observer)).await;
    let handler = Arc::new(handler);
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let server = socket.local_addr().unwrap();
    let tasks = TaskTracker::new();
    let (stop, stopped) = watch::channel(false);

    // Warm the reply cache (the full path answers first), through the loop itself.
    let mut warm_clients = Vec::new();
    let warm = tokio::spawn(serve_udp(
        socket.clone(),
        handler.clone(),
        Arc::new(Semaphore::new(MAX_PENDING)),
        tasks.clone(),
        stopped.clone(),
    ));
    for (i, name) in ["api.fast.test.", "www.fast.test."].iter().enumerate() {
        let c = client();
        warm_clients.push(c.local_addr().unwrap());
        c.send_to(
            &query(u16::try_from(i).unwrap(), name, RecordType::A),
            server,
        )
        .unwrap();
        let reply = tokio::task::spawn_blocking(move || reply_of(&c))
            .await
            .unwrap();
        assert_eq!(addresses(&reply).len(), 2, "warm-up of {name}");
    }
    stop.send(true).unwrap();
    warm.await.unwrap();
    let (stop, stopped) = watch::channel(false);

    // Queue a burst while nothing reads, so that it is waiting as one batch.
    let kinds = ["hit", "cname hit", "denied", "miss"];
    let mut live = Vec::new();
    let mut want_names = HashMap::new();
    for i in 0..BATCH - 4 {
        let id = 0x1000 + u16::try_from(i).unwrap();
        let name = match kinds[i % kinds.len()] {
            "hit" => "api.fast.test.".to_owned(),
            "cname hit" => "www.fast.test.".to_owned(),
            "denied" => format!("evil{i}.example."),
            _ => format!("miss{i}.fast.test."),
        };
        let c = client();
        c.send_to(&query(id, &name, RecordType::A), server).unwrap();
        want_names.insert(c.local_addr().unwrap(), name.clone());
        live.push((c, id, name, kinds[i % kinds.len()]));
    }
    let garbage = client();
    garbage.send_to(b"\x01\x02\x03", server).unwrap();
    want_names.insert(garbage.local_addr().unwrap(), String::new());
    let gone = client();
    gone.send_to(&query(0x0bad, "api.fast.test.", RecordType::A), server)
        .unwrap();
    want_names.insert(gone.local_addr().unwrap(), "api.fast.test.".to_owned());
    drop(gone);
    let root = is_root();
    let control = client();
    if root {
        // The same query from port 0 (ignored) and, as the control, from a real port.
        raw_udp(server, 0, &query(0x0000, "api.fast.test.", RecordType::A));
        let port = control.local_addr().unwrap().port();
        raw_udp(
            server,
            port,
            &query(0x7777, "api.fast.test.", RecordType::A),
        );
        want_names.insert(control.local_addr().unwrap(), "api.fast.test.".to_owned());
    }

    // Two loops on the one socket, as a server with two runtime workers runs them.
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let serving: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(serve_udp(
                socket.clone(),
                handler.clone(),
                pending.clone(),
                tasks.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    for (c, id, name, kind) in live {
        let reply = tokio::task::spawn_blocking(move || reply_of(&c))
            .await
            .unwrap();
        assert_eq!(reply.metadata.id, id, "{kind} {name}: its own ID");
        let question = reply.queries.first().expect("the question");
        assert_eq!(question.name().to_ascii(), name, "{kind}: its own question");
        match kind {
            "hit" | "cname hit" => {
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::NoError,
                    "{kind}"
                );
                let mut got = addresses(&reply);
                got.sort();
                assert_eq!(got, ["11.0.0.1", "11.0.0.2"], "{kind}");
            }
            _ => {
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::NXDomain,
                    "{kind} {name}"
                );
                assert!(addresses(&reply).is_empty(), "{kind}");
            }
        }
    }
    if root {
        let reply = tokio::task::spawn_blocking(move || reply_of(&control))
            .await
            .unwrap();
        assert_eq!(
            reply.metadata.id, 0x7777,
            "control: the raw socket's datagram is answered"
        );
    }

    // The loop survived the ICMP errors of the gone client: a later query is answered.
    let after = client();
    after
        .send_to(&query(0x4321, "api.fast.test.", RecordType::A), server)
        .unwrap();
    let reply = tokio::task::spawn_blocking(move || reply_of(&after))
        .await
        .unwrap();
    assert_eq!(reply.metadata.id, 0x4321, "answered after the burst");

    stop.send(true).unwrap();
    for serving in serving {
        serving.await.unwrap();
    }
    tasks.close();
    tasks.wait().await;
    let logged = logged.lock().unwrap().clone();
    let mut by_client: HashMap<SocketAddr, Vec<(String, Option<String>)>> = HashMap::new();
    for (client, name, error) in logged {
        if warm_clients.contains(&client) {
            continue;
        }
        by_client.entry(client).or_default().push((name, error));
    }
    for (client, name) in &want_names {
        let records = by_client.remove(client).unwrap_or_default();
        assert_eq!(
            records.len(),
            1,
            "one record for {client} ({name}): {records:?}"
        );
        if !name.is_empty() {
            assert_eq!(&records[0].0, name, "the record names {client}'s question");
        }
    }
    // What is left: the query after the burst, and nothing from port 0.
    assert_eq!(by_client.len(), 1, "unexpected records: {by_client:?}");
    assert!(
        by_client.keys().all(|client| client.port() != 0),
        "a datagram from port 0 was answered"
    );
}
