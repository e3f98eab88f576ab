use raftmq_tests::TestBroker;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reaches_mosquitto_sub() {
    let broker = TestBroker::start().await;
    let (host, port) = broker.host_port();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port.to_string(), "-t", "a/#", "-C", "1", "-W", "10", "-V", "mqttv5"])
        .output();
    let pub_task = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let st = Command::new("mosquitto_pub")
            .args(["-h", &host, "-p", &port.to_string(), "-t", "a/b", "-m", "hello", "-q", "1"])
            .status()
            .expect("run mosquitto_pub");
        assert!(st.success());
    };
    let (out, ()) = tokio::join!(sub, pub_task);
    let out = out.expect("run mosquitto_sub");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
}
